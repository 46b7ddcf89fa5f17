"""Federated protocols in the Flower Simulation Engine (one Ray actor per CPU given to a client)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr's in-memory state database setup chatter

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from server.job import run_federated  # noqa: E402

logger = logging.getLogger(__name__)


def simulation_launcher(cfg: DictConfig, client_app=None):
    """A launcher that runs ``server_main(grid)`` as the ServerApp of a Flower simulation."""
    from flwr.simulation import run_simulation

    if client_app is None:
        from clients.client_app import app as client_app

    def launch(server_main) -> None:
        server_app = ServerApp()

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            server_main(grid)

        cpus = float(cfg.federation.cpus_per_client)
        backend_config = {
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(int(cpus), os.cpu_count() or 1),
                "logging_level": "ERROR",
                "log_to_driver": False,
                "include_dashboard": False,
            },
        }
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)  # run_simulation's deprecation notice
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=int(cfg.federation.num_clients),
                backend_config=backend_config,
            )
        finally:
            flwr_logger.setLevel(level)

    return launch


def run_simulated(cfg: DictConfig, out_dir: Path, client_app=None) -> dict:
    """A federated protocol on ``federation.num_clients`` simulated sites (``client_app``: for tests)."""
    return run_federated(cfg, out_dir, simulation_launcher(cfg, client_app))
