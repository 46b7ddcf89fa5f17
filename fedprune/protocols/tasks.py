"""Site tasks: what a site does for one message type, as a plain function of its context and the request.

Each protocol module registers its tasks here (:func:`site_task`); the Flower ClientApp registers one
handler per entry of :data:`SITE_TASKS`, and :class:`InProcessTransport` calls them directly (tests run a
protocol's server routine against real site code without Flower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedprune.protocols.federation import Federation, Launcher, Reply, Request, Response

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A site's own context: its node id and node config (``partition-id``/``num-partitions`` in
    simulation, ``data-path`` at a real site)."""

    node_id: int
    node_config: Mapping = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The name this site keeps its state under."""
        node = self.node_config
        return f"p{node['partition-id']}" if "partition-id" in node else f"n{self.node_id}"


SiteTask = Callable[[Site, Request], Reply]
SITE_TASKS: dict[str, SiteTask] = {}


def site_task(name: str) -> Callable[[SiteTask], SiteTask]:
    """Register a site task under its message type (``train.<x>`` or ``query.<x>``)."""

    def register(function: SiteTask) -> SiteTask:
        if name in SITE_TASKS:
            raise ValueError(f"site task {name!r} registered twice")
        SITE_TASKS[name] = function
        return function

    return register


def reply(arrays: dict | None, metrics: dict) -> Reply:
    """A reply with ``payload`` arrays (None: no payload record) and metrics."""
    return Reply(arrays={} if arrays is None else dict(arrays), metrics=dict(metrics))


def arrays_bytes(arrays: Mapping[str, np.ndarray] | None) -> int:
    """Bytes of array data."""
    return int(sum(np.asarray(a).nbytes for a in (arrays or {}).values()))


class InProcessTransport:
    """Runs the registered site tasks in this process (tests): one :class:`Site` per node."""

    def __init__(self, sites: list[Site], tasks: Mapping[str, SiteTask] | None = None):
        self.sites = {site.node_id: site for site in sites}
        self.tasks = SITE_TASKS if tasks is None else tasks

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def request_bytes(self, request: Request) -> int:
        return arrays_bytes(request.update) + arrays_bytes(request.routed)

    def exchange(self, task: str, requests: dict[int, Request], timeout: float | None) -> list[Response]:
        out = []
        for node, request in requests.items():
            try:
                answer = self.tasks[task](self.sites[node], request)
            except Exception as error:  # noqa: BLE001  (a site's failure is its reply, as in Flower)
                logger.info("site %d failed %s: %s", node, task, error)
                out.append(Response(node, None, f"{type(error).__name__}: {error}", 0))
                continue
            out.append(Response(node, answer, None, arrays_bytes(answer.arrays)))
        return out


def in_process_launcher(
    num_sites: int,
    min_clients: int,
    tasks: Mapping[str, SiteTask] | None = None,
    node_config: Callable[[int], Mapping] | Mapping | None = None,
) -> Launcher:
    """A launcher that runs ``server_main(federation)`` with ``num_sites`` simulated sites in this process
    (site i holds partition i of ``num_sites``, as in a Flower simulation); ``node_config``: more node
    config keys for every site, or ``i -> keys`` for site i (a site's policy, :mod:`site_policy`). The
    sites have no identities: they run secure aggregation unauthenticated (``secagg-unauthenticated``;
    see ``secure_site``)."""

    def extra(i: int) -> Mapping:
        return node_config(i) if callable(node_config) else node_config or {}

    def launch(server_main) -> None:
        node = {"num-partitions": num_sites, "secagg-unauthenticated": True}
        sites = [Site(100 + i, {"partition-id": i, **node, **extra(i)}) for i in range(num_sites)]
        transport = InProcessTransport(sites, tasks)
        server_main(Federation(transport, transport.node_ids(), min_clients))

    return launch
