"""The fedprune ServerApp for the Deployment Engine (``flwr run``): the Hydra config with the run's overrides.

The run config has two keys (``[tool.flwr.app.config]`` in pyproject.toml):

``overrides``  Hydra override strings separated by spaces, exactly as after ``fedprune`` on the command
               line, e.g. ``"protocol=stats_sync pruner=wanda federation.num_clients=2"``.
``out-dir``    where ``metrics.json``, ``sparsity.json``, ``model/`` and ``.hydra/`` are written, on the
               SuperLink's host (a relative path is relative to the SuperLink's working directory).

The config is composed from ``conf/`` (the single source of truth), checked like the CLI checks it, and
run by :func:`server.job.run_federated` over the Deployment Engine's grid.
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

from cli.common import summary_table  # noqa: E402
from cli.main import SUMMARIES, validate  # noqa: E402
from cli.validate import ConfigError  # noqa: E402
from server.job import run_federated  # noqa: E402
from server.workflows import WORKFLOWS  # noqa: E402

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


def _hidenseek_job(cfg: DictConfig, out_dir: Path, launch) -> dict:
    from cli.hidenseek import run_hidenseek

    return run_hidenseek(cfg, out_dir, launch=launch)


# protocol name -> job(cfg, out_dir, launch) for the protocols that run over a federation
GRID_JOBS = {**{name: run_federated for name in WORKFLOWS}, "hidenseek": _hidenseek_job}


def check_federated(cfg: DictConfig) -> None:
    """The CLI's checks, and a protocol that runs over a federation."""
    validate(cfg)
    if str(cfg.protocol.name) not in GRID_JOBS:
        raise ConfigError(
            f"config key 'protocol.name': {cfg.protocol.name!r} does not run over a federation; "
            f"under flwr run use one of {sorted(GRID_JOBS)}"
        )


def write_config(out_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """The composed config and the overrides under ``out_dir/.hydra/``, as the CLI's Hydra run writes."""
    folder = out_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)), encoding="utf-8")


def _show_progress_logs() -> None:
    """fedprune's INFO logs in the ServerApp's log (streamed by ``flwr run --stream``)."""
    for name in ("fedprune", "server", "cli"):
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
    check_federated(cfg)
    logger.info("run %s: %s -> %s", context.run_id, " ".join(overrides) or "(defaults)", out_dir)
    write_config(out_dir, cfg, overrides)
    metrics = GRID_JOBS[str(cfg.protocol.name)](cfg, out_dir, lambda server_main: server_main(grid))
    print(SUMMARIES.get(str(cfg.protocol.name), summary_table)(metrics))
    print(f"  outputs            {out_dir}")
