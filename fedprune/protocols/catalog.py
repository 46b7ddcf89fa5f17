"""Every protocol, registered: importing this module fills :data:`PROTOCOLS` and :data:`SITE_TASKS`.

Adding a protocol means one module (registering its :class:`ProtocolUnit` and site tasks), one line
here, one ``conf/protocol/*.yaml`` and its tests.
"""

import fedprune.hidenseek.job  # noqa: F401  (hidenseek)
from fedprune.protocols import centralized, local, mask_vote, mask_vote_sync, secure_site, stats_sync  # noqa: F401
from fedprune.protocols.registry import PROTOCOLS, ProtocolUnit, get_protocol, validate
from fedprune.protocols.tasks import SITE_TASKS

__all__ = ["PROTOCOLS", "SITE_TASKS", "ProtocolUnit", "get_protocol", "validate"]
