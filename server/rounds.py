"""One communication round: send, receive, validate, count bytes; malformed replies are left out."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedprune.payload import PayloadError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class FederationError(RuntimeError):
    """Too few valid replies to go on; nothing is written."""


def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as sent (payloads and keys)."""
    return int(sum(record.count_bytes() for record in content.values()))


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays."""
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    """The ``payload`` arrays of a reply (empty if none)."""
    if "payload" not in reply.content:
        return {}
    return {key: array.numpy() for key, array in reply.content["payload"].items()}


@dataclass
class Federation:
    """The server's view of the sites: who is alive, bytes each way, time per round."""

    grid: Grid
    nodes: list[int]
    min_clients: int
    timeout: float | None = None
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    round_seconds: list[float] = field(default_factory=list)
    rejected: list[tuple[int, int, str]] = field(default_factory=list)  # (round, node, reason)

    def round(
        self,
        message_type: str,
        config: dict,
        arrays: dict[str, np.ndarray] | None,
        validate: Callable[[int, Message], T],
        nodes: Iterable[int] | None = None,
        node_arrays: Mapping[int, dict[str, np.ndarray]] | None = None,
    ) -> dict[int, T]:
        """Send one message to each node; return ``{node: validate(node, reply)}`` for the valid replies.

        A reply that errored, came from a node that was not asked, or fails ``validate`` (raising
        :class:`PayloadError` or ``ValueError``) is logged with its reason and left out; a node whose
        handler raised is dropped for the rest of the run. Raises :class:`FederationError` when fewer
        than ``min_clients`` valid replies remain. ``node_arrays`` adds a ``secagg`` record of arrays
        addressed to one node (secure-aggregation routing).
        """
        start = time.perf_counter()
        number = len(self.round_seconds)
        asked = list(self.nodes if nodes is None else nodes)
        messages = []
        for node in asked:
            content = RecordDict({"config": ConfigRecord(config)})
            if arrays:
                content["update"] = array_record(arrays)
            if node_arrays is not None:
                content["secagg"] = array_record(node_arrays[node])
            self.bytes_down[node] += message_bytes(content)
            messages.append(Message(content=content, dst_node_id=node, message_type=message_type))
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        valid: dict[int, T] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in asked or node in valid:
                self.reject(number, node, "reply from a node that was not asked (or a duplicate)")
                continue
            if reply.has_error():
                self.reject(number, node, f"client error: {reply.error.reason[:300]}")
                self.nodes = [n for n in self.nodes if n != node]
                continue
            self.bytes_up[node] += message_bytes(reply.content)
            try:
                valid[node] = validate(node, reply)
            except (PayloadError, ValueError, KeyError, TypeError) as error:
                self.reject(number, node, f"malformed reply: {error}")
        missing = set(asked) - set(valid) - {n for r, n, _ in self.rejected if r == number}
        for node in missing:
            self.reject(number, node, "no reply")
        self.round_seconds.append(time.perf_counter() - start)
        if len(valid) < self.min_clients:
            raise FederationError(
                f"round {number} ({message_type}): {len(valid)} valid replies, "
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
