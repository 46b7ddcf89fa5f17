"""The ``fedprune`` command: a Hydra app that turns the config into the typed job, checks it, runs the
protocol (a federated one in a Flower simulation) and prints its summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedprune.config import ConfigError, JobConfig
from fedprune.data.assets import AssetError
from fedprune.protocols.catalog import ProtocolUnit
from fedprune.protocols.catalog import validate as validate_job

logger = logging.getLogger("fedprune")

# conf/ beside the packages (an absolute path works for console scripts and `python -m` alike)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def job_of(cfg: DictConfig) -> JobConfig:
    """The typed job of a composed Hydra config."""
    return JobConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))


def validate(cfg: DictConfig) -> ProtocolUnit:
    """Every check that can run before the model loads; the protocol unit."""
    return validate_job(job_of(cfg))


def run(cfg: DictConfig, out_dir: Path, client_app=None) -> dict:
    """Validate, run the protocol's job (federated ones in a Flower simulation), print the summary."""
    job = job_of(cfg)
    unit = validate_job(job)
    launch = None
    if unit.federated:
        from cli.simulation import simulation_launcher, with_site_identities  # flwr (and Ray) when needed

        job, identities = with_site_identities(job, out_dir)
        launch = simulation_launcher(job.federation, client_app, identities)
    metrics = unit.run(job, out_dir, launch)
    print(unit.summary(metrics))
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
