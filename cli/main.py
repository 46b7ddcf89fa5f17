"""The ``fedprune`` command: a Hydra app that validates the config, then runs the chosen protocol."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cli.centralized import run_centralized
from cli.common import summary_table
from cli.hidenseek import summary_table as hidenseek_summary
from cli.hidenseek import validate_hidenseek
from cli.local import run_local
from cli.validate import ConfigError, validate_common, validate_federation, validate_privacy
from fedprune.data.assets import AssetError

logger = logging.getLogger("fedprune")

# conf/ beside the packages (an absolute path works for console scripts and `python -m` alike)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


# protocol name -> job(cfg, out_dir) -> metrics. Hydra's `protocol` config group maps onto this.
def _simulated(cfg: DictConfig, out_dir: Path) -> dict:
    from cli.federated import run_simulated  # imports flwr (and Ray) only when needed

    return run_simulated(cfg, out_dir)


def _hidenseek(cfg: DictConfig, out_dir: Path) -> dict:
    from cli.hidenseek import run_hidenseek  # imports flwr (and Ray) only when needed

    return run_hidenseek(cfg, out_dir)


PROTOCOLS: dict[str, Callable[[DictConfig, Path], dict]] = {
    "centralized": run_centralized,
    "local": run_local,
    "stats_sync": _simulated,
    "mask_vote": _simulated,
    "mask_vote_sync": _simulated,
    "hidenseek": _hidenseek,
}

# protocols with their own config checks and summary instead of the LLM ones (no model or corpus)
OWN_CHECKS: dict[str, Callable[[DictConfig], None]] = {"hidenseek": validate_hidenseek}
SUMMARIES: dict[str, Callable[[dict], str]] = {"hidenseek": hidenseek_summary}


def validate(cfg: DictConfig) -> None:
    """Every check that can run before the model loads."""
    if cfg.protocol.name not in PROTOCOLS:
        raise ConfigError(
            f"config key 'protocol.name': unknown protocol {cfg.protocol.name!r}; known: {sorted(PROTOCOLS)}"
        )
    if cfg.protocol.name in OWN_CHECKS:
        validate_privacy(cfg)
        OWN_CHECKS[cfg.protocol.name](cfg)
        return
    validate_common(cfg)
    validate_federation(cfg)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Validate, run the protocol's job, print the summary."""
    validate(cfg)
    metrics = PROTOCOLS[cfg.protocol.name](cfg, out_dir)
    print(SUMMARIES.get(cfg.protocol.name, summary_table)(metrics))
    print(f"  outputs            {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, out_dir)
    except (ConfigError, AssetError) as error:
        logger.error("%s", error)
        sys.exit(2)


def main() -> None:
    """Console-script entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
