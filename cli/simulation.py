"""The launcher for the Flower Simulation Engine: runs a protocol's server routine inside a ServerApp
of ``run_simulation``, with ``federation.num_clients`` simulated SuperNodes (one Ray actor per CPU given to
a client).

Secure aggregation authenticates the sites with long-term identities (``fedprune.secure.identity``).
Flower gives simulated sites only ``partition-id``/``num-partitions`` as node config, so
:func:`with_site_identities` writes one identity per site and the roster under the run's folder, and
the launcher sets ``FEDPRUNE_SECAGG_IDENTITIES`` to that folder while the simulation runs (its Ray
workers inherit the environment); each site reads ``site-<partition-id>.key`` there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr's in-memory state database setup chatter

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedprune.config import FederationSpec, JobConfig  # noqa: E402
from fedprune.protocols.federation import Launcher  # noqa: E402
from fedprune.protocols.secure_site import IDENTITY_ENV, provision_simulated_identities  # noqa: E402
from server.flower_transport import grid_federation  # noqa: E402

logger = logging.getLogger(__name__)


IDENTITY_FOLDER = "secagg-identities"


def with_site_identities(job: JobConfig, out_dir: Path) -> tuple[JobConfig, Path | None]:
    """For secure aggregation without a ``privacy.roster``: fresh site identities and their roster under
    ``out_dir``, the job pointing at that roster, and the folder for :func:`simulation_launcher`."""
    if job.privacy.name == "none" or job.privacy.roster is not None:
        return job, None
    folder = Path(out_dir) / IDENTITY_FOLDER
    roster = provision_simulated_identities(folder, job.federation.num_clients)
    return replace(job, privacy=replace(job.privacy, roster=str(roster))), folder


def simulation_launcher(fed: FederationSpec, client_app=None, identities: Path | None = None) -> Launcher:
    """A launcher that runs ``server_main(federation)`` in a Flower simulation (``client_app``: for
    tests; default the fedprune ClientApp; ``identities``: the sites' identity folder, from
    :func:`with_site_identities`)."""
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
        previous = os.environ.get(IDENTITY_ENV)
        if identities is not None:
            os.environ[IDENTITY_ENV] = str(identities)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=fed.num_clients,
                backend_config=backend_config,
            )
        finally:
            flwr_logger.setLevel(level)
            _restore(IDENTITY_ENV, previous)

    return launch


def _restore(name: str, value: str | None) -> None:
    """Put an environment variable back as it was."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
