"""The Flower grid as a :class:`fedprune.protocols.federation.Transport` (thin: records in, records out).

A request becomes a ``Message`` with records ``config`` (ConfigRecord), ``update`` and ``secagg``
(ArrayRecords); a reply's ``payload`` ArrayRecord and ``metrics`` MetricRecord become a ``Reply``. Bytes
are counted as Flower sends them (``RecordDict.count_bytes``).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedprune.config import FederationSpec
from fedprune.protocols.federation import Federation, Launcher, Reply, Request, Response, wait_for_nodes

logger = logging.getLogger(__name__)


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays."""
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def request_content(request: Request) -> RecordDict:
    """The records of one request."""
    content = RecordDict({"config": ConfigRecord(request.config)})
    if request.update:
        content["update"] = array_record(request.update)
    if request.routed is not None:
        content["secagg"] = array_record(request.routed)
    return content


def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as sent (payloads and keys)."""
    return int(sum(record.count_bytes() for record in content.values()))


def reply_of(message: Message) -> Reply:
    """A Flower reply as a ``Reply`` (empty payload if none)."""
    content = message.content
    arrays = {k: a.numpy() for k, a in content["payload"].items()} if "payload" in content else {}
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    return Reply(arrays, metrics)


class FlowerTransport:
    """Requests as Flower messages over a ServerApp's grid."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def request_bytes(self, request: Request) -> int:
        return message_bytes(request_content(request))

    def exchange(self, task: str, requests: dict[int, Request], timeout: float | None) -> list[Response]:
        messages = [
            Message(content=request_content(request), dst_node_id=node, message_type=task)
            for node, request in requests.items()
        ]
        out = []
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # a reply belongs to the node its request went to (the grid sets each request's id on push): an
        # error reply for a dead node comes from the SuperLink (its own node id), not from the node
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        for message in replies:
            node = asked.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
            if message.has_error():
                out.append(Response(node, None, message.error.reason, 0))
                continue
            try:
                answer = reply_of(message)
            except (KeyError, TypeError, ValueError) as error:
                out.append(Response(node, None, f"unreadable reply: {error}", 0))
                continue
            out.append(Response(node, answer, None, message_bytes(message.content)))
        return out


def grid_federation(grid: Grid, num_clients: int, min_clients: int, timeout: float | None) -> Federation:
    """A :class:`Federation` of the first ``num_clients`` nodes to connect to ``grid``."""
    transport = FlowerTransport(grid)
    return Federation(transport, wait_for_nodes(transport, num_clients), min_clients, timeout)


def grid_launcher(grid: Grid, fed: FederationSpec) -> Launcher:
    """A launcher over an existing grid (the Deployment Engine's, inside ``flwr run``)."""

    def launch(server_main) -> None:
        server_main(grid_federation(grid, fed.num_clients, fed.min_clients, fed.round_timeout))

    return launch
