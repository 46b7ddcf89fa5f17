"""The launcher for the Flower Simulation Engine: runs a protocol's server routine inside a ServerApp
of ``run_simulation``, with ``federation.num_clients`` simulated SuperNodes (one Ray actor per CPU given to
a client)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr's in-memory state database setup chatter

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedprune.config import FederationSpec  # noqa: E402
from fedprune.protocols.federation import Launcher  # noqa: E402
from server.flower_transport import grid_federation  # noqa: E402

logger = logging.getLogger(__name__)


def simulation_launcher(fed: FederationSpec, client_app=None) -> Launcher:
    """A launcher that runs ``server_main(federation)`` in a Flower simulation (``client_app``: for
    tests; default the fedprune ClientApp)."""
    from flwr.simulation import run_simulation

    if client_app is None:
        from clients.client_app import app as client_app

    def launch(server_main) -> None:
        server_app = ServerApp()

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            server_main(grid_federation(grid, fed.num_clients, fed.min_clients, fed.round_timeout))

        backend_config = {
            "client_resources": {"num_cpus": fed.cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": max(int(fed.cpus_per_client), os.cpu_count() or 1),
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
                num_supernodes=fed.num_clients,
                backend_config=backend_config,
            )
        finally:
            flwr_logger.setLevel(level)

    return launch
