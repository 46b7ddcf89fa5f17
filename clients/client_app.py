"""The fedprune Flower ClientApp (thin): one handler per registered site task.

A message of type ``train.<x>`` / ``query.<x>`` is decoded into a
:class:`~fedprune.protocols.federation.Request` (its ``config``, ``update`` and ``secagg`` records), the
site task of that name (:data:`fedprune.protocols.SITE_TASKS`, registered by each protocol module) runs
with the site's context (node id and node config), and its :class:`Reply` is encoded back (``payload``
ArrayRecord, ``metrics`` MetricRecord). Parameters travel in each message's ``config`` record
(simulation gives clients no run config).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedprune.protocols.catalog import SITE_TASKS  # noqa: E402
from fedprune.protocols.federation import Reply, Request  # noqa: E402
from fedprune.protocols.tasks import Site, SiteTask  # noqa: E402

logger = logging.getLogger(__name__)


def request_of(msg: Message) -> Request:
    """A Flower message as a ``Request``."""
    content = msg.content

    def arrays(name: str) -> dict | None:
        return {k: a.numpy() for k, a in content[name].items()} if name in content else None

    return Request(dict(content["config"]), arrays("update"), arrays("secagg"))


def message_of(reply: Reply, msg: Message) -> Message:
    """A ``Reply`` as the Flower reply to ``msg`` (no ``payload`` record when it has no arrays)."""
    content = RecordDict({"metrics": MetricRecord(reply.metrics)})
    if reply.arrays:
        content["payload"] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    return Message(content, reply_to=msg)


def site_of(context: Context) -> Site:
    return Site(int(context.node_id), dict(context.node_config))


def handler(task: SiteTask):
    """A Flower handler running ``task``."""

    def handle(msg: Message, context: Context) -> Message:
        return message_of(task(site_of(context), request_of(msg)), msg)

    return handle


def build_app(tasks: Mapping[str, SiteTask]) -> ClientApp:
    """A ClientApp with one handler per task (``train.<x>`` / ``query.<x>``)."""
    client_app = ClientApp()
    for name, task in tasks.items():
        action, _, kind = name.partition(".")
        getattr(client_app, action)(kind)(handler(task))
    return client_app


app = build_app(SITE_TASKS)
