"""The server's view of the sites, without Flower: one round = send a task, receive, validate, count bytes.

A protocol's server routine talks to a :class:`Federation`; how messages travel is a :class:`Transport`
(the Flower grid in ``server/``, or :class:`InProcessTransport` that calls the site tasks directly, for
tests). Malformed replies are logged with their reason and left out, as are replies that a round's
``screen`` finds implausible next to the others; a round with fewer than ``min_clients`` valid replies
stops the run (:class:`FederationError`), so nothing is written.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from fedprune.payload import PayloadError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Arrays = dict[str, np.ndarray]


class FederationError(RuntimeError):
    """Too few valid replies to go on; nothing is written."""


@dataclass(frozen=True)
class Request:
    """What one site is sent: the task's config (flat scalars and lists), arrays for all, arrays for it."""

    config: dict
    update: Arrays | None = None  # the same for every site (a block's edit, a global state)
    routed: Arrays | None = None  # addressed to this site only (secure-aggregation routing)


@dataclass(frozen=True)
class Reply:
    """A site's answer: ``payload`` arrays and scalar ``metrics``."""

    arrays: Arrays
    metrics: dict


@dataclass(frozen=True)
class Response:
    """What came back from one node: a reply, or the error its handler raised; bytes of the reply."""

    node: int
    reply: Reply | None
    error: str | None
    bytes_up: int


class Transport(Protocol):
    """How requests reach the sites (the Flower grid, or in process)."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""

    def request_bytes(self, request: Request) -> int:
        """Bytes of a request as sent."""

    def exchange(self, task: str, requests: dict[int, Request], timeout: float | None) -> list[Response]:
        """Send each node its request; the responses that came back (any order)."""


@dataclass
class Federation:
    """The server's view of the sites: who is alive, bytes each way, time per round, rejected replies."""

    transport: Transport
    nodes: list[int]
    min_clients: int
    timeout: float | None = None
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    round_seconds: list[float] = field(default_factory=list)
    rejected: list[tuple[int, int, str]] = field(default_factory=list)  # (round, node, reason)
    site_numbers: dict[int, int] = field(default_factory=dict)  # node -> its site's stable number

    def in_site_order(self, nodes) -> list[int]:
        """``nodes`` by site number (node id where unknown): a fixed order for sums of floats, the same
        when a restarted run draws new node ids or replies arrive in another order."""
        return sorted(nodes, key=lambda node: (self.site_numbers.get(node, node), node))

    def round(
        self,
        task: str,
        config: dict,
        arrays: Arrays | None,
        validate: Callable[[int, Reply], T],
        nodes: Iterable[int] | None = None,
        node_arrays: Mapping[int, Arrays] | None = None,
        screen: Callable[[dict[int, T]], Mapping[int, str]] | None = None,
        required: int | None = None,
    ) -> dict[int, T]:
        """Send ``task`` to each node; return ``{node: validate(node, reply)}`` for the valid replies.

        A reply that errored, came from a node that was not asked, or fails ``validate`` (raising
        :class:`PayloadError`, ``ValueError``, ``KeyError`` or ``TypeError``) is logged with its reason
        and left out; a node whose handler raised is dropped for the rest of the run. ``screen(valid)``
        then names the valid replies to leave out too, with their reasons (checks that compare the
        sites). Raises :class:`FederationError` when fewer than ``required`` (default ``min_clients``)
        valid replies remain.
        ``node_arrays`` adds arrays addressed to one node (secure-aggregation routing).
        """
        start = time.perf_counter()
        number = len(self.round_seconds)
        asked = list(self.nodes if nodes is None else nodes)
        requests = {
            node: Request(config, arrays or None, None if node_arrays is None else node_arrays[node])
            for node in asked
        }
        for node, request in requests.items():
            self.bytes_down[node] += self.transport.request_bytes(request)
        responses = self.transport.exchange(task, requests, self.timeout)
        valid: dict[int, T] = {}
        for response in responses:
            node = response.node
            if node not in asked or node in valid:
                self.reject(number, node, "reply from a node that was not asked (or a duplicate)")
                continue
            if response.error is not None or response.reply is None:
                self.reject(number, node, f"client error: {str(response.error)[:300]}")
                self.nodes = [n for n in self.nodes if n != node]
                continue
            self.bytes_up[node] += response.bytes_up
            try:
                valid[node] = validate(node, response.reply)
            except (PayloadError, ValueError, KeyError, TypeError) as error:
                self.reject(number, node, f"{getattr(error, 'label', PayloadError.label)}: {error}")
        for node, reason in (screen(valid) if screen is not None and valid else {}).items():
            self.reject(number, node, reason)
            del valid[node]
        missing = set(asked) - set(valid) - {n for r, n, _ in self.rejected if r == number}
        for node in missing:
            self.reject(number, node, "no reply")
        self.round_seconds.append(time.perf_counter() - start)
        if len(valid) < (self.min_clients if required is None else required):
            raise FederationError(
                f"round {number} ({task}): {len(valid)} valid replies, "
                f"fewer than federation.min_clients={self.min_clients}; stopping without output"
            )
        return valid

    def reject(self, number: int, node: int, reason: str) -> None:
        """Log and record that ``node``'s reply in round ``number`` was left out, and why."""
        logger.warning("round %d: rejected node %d: %s", number, node, reason)
        self.rejected.append((number, node, reason))

    def mean_bytes(self, table: dict[int, int]) -> float:
        """Mean bytes per site that ever took part."""
        return float(np.mean(list(table.values()))) if table else 0.0

    def admit_new_nodes_(self, known: set[int]) -> list[int]:
        """Add nodes that connected since ``known`` was taken to ``nodes`` (and ``known``); return them."""
        new = [node for node in sorted(self.transport.node_ids()) if node not in known]
        self.nodes = [*self.nodes, *new]
        known.update(new)
        if new:
            logger.info("%d site(s) joined; they get the current state", len(new))
        return new


def wait_for_nodes(transport: Transport, count: int, timeout_s: float = 120.0) -> list[int]:
    """The first ``count`` node ids (sorted) once that many have connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(transport.node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} sites connected within {timeout_s:.0f} s")
        time.sleep(0.5)


Launcher = Callable[[Callable[[Federation], None]], None]  # runs server_main(federation) somewhere
