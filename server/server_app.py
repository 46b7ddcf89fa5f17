"""The fedprune ServerApp for the Deployment Engine (``flwr run``): the Hydra config with the run's overrides.

The run config has two keys (``[tool.flwr.app.config]`` in pyproject.toml):

``overrides``  Hydra override strings separated by spaces, exactly as after ``fedprune`` on the command
               line, e.g. ``"protocol=stats_sync pruner=wanda federation.num_clients=2"``.
``out-dir``    where ``metrics.json``, ``sparsity.json``, ``model/`` and ``.hydra/`` are written, on the
               SuperLink's host (a relative path is relative to the SuperLink's working directory).

The config is composed from ``conf/`` (the single source of truth), turned into the typed job and checked
as the CLI does, and the protocol's job runs over the Deployment Engine's grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedprune.config import ConfigError, JobConfig  # noqa: E402
from fedprune.protocols.catalog import ProtocolUnit, validate  # noqa: E402
from server.flower_transport import grid_launcher  # noqa: E402

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_OUT_DIR = "outputs/deployment"
_OPEN = {"[": "]", "{": "}", "(": ")"}


def split_overrides(text: str) -> list[str]:
    """Hydra override strings from one line: split at whitespace outside quotes and brackets.

    Quotes and brackets are kept for Hydra's own parser, so ``"a=[x, y] b='p q'"`` gives
    ``["a=[x, y]", "b='p q'"]``.

    Raises
    ------
    ConfigError
        On an unclosed quote or bracket.
    """
    parts: list[str] = []
    current: list[str] = []
    closers: list[str] = []  # expected closing brackets, innermost last
    quote = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            closers.append(_OPEN[char])
        elif closers and char == closers[-1]:
            closers.pop()
        elif char.isspace() and not closers:
            if current:
                parts.append("".join(current))
                current = []
            continue
        current.append(char)
    if quote or closers:
        raise ConfigError(f"run config key 'overrides': unclosed {quote or closers[-1]!r} in {text!r}")
    if current:
        parts.append("".join(current))
    return parts


def compose_config(overrides: list[str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """The Hydra config of ``conf_dir`` with ``overrides`` applied (as ``fedprune <overrides>`` would)."""
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def job_of(cfg: DictConfig) -> JobConfig:
    """The typed job of a composed config."""
    return JobConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def check_federated(job: JobConfig) -> ProtocolUnit:
    """The CLI's checks, a protocol that runs over a federation, and for secure aggregation the sites'
    roster (real sites refuse unauthenticated secure aggregation); its unit."""
    unit = validate(job)
    if job.privacy.name != "none" and job.privacy.roster is None:
        raise ConfigError(
            f"config key 'privacy.roster': privacy={job.privacy.name} under flwr run needs the roster of the "
            "sites' identity public keys (a JSON list; each site: `python -m fedprune.secure.identity new "
            "PATH`, and node config identity-key=PATH roster=PATH)"
        )
    if not unit.federated:
        from fedprune.protocols.catalog import PROTOCOLS

        raise ConfigError(
            f"config key 'protocol.name': {job.protocol_name!r} does not run over a federation; "
            f"under flwr run use one of {sorted(n for n, u in PROTOCOLS.items() if u.federated)}"
        )
    return unit


def write_config(out_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """The composed config and the overrides under ``out_dir/.hydra/``, as the CLI's Hydra run writes."""
    folder = out_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)), encoding="utf-8")


def _show_progress_logs() -> None:
    """fedprune's INFO logs in the ServerApp's log (streamed by ``flwr run --stream``)."""
    for name in ("fedprune", "server"):
        named = logging.getLogger(name)
        if not named.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            named.addHandler(handler)
            named.setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose and check the config, run the federated job over ``grid``, write results to ``out-dir``."""
    _show_progress_logs()
    overrides = split_overrides(str(context.run_config.get("overrides", "")))
    out_dir = Path(str(context.run_config.get("out-dir", DEFAULT_OUT_DIR))).expanduser().resolve()
    cfg = compose_config(overrides)
    job = job_of(cfg)
    unit = check_federated(job)
    logger.info("run %s: %s -> %s", context.run_id, " ".join(overrides) or "(defaults)", out_dir)
    write_config(out_dir, cfg, overrides)
    metrics = unit.run(job, out_dir, grid_launcher(grid, job.federation))
    print(unit.summary(metrics))
    print(f"  outputs            {out_dir}")
