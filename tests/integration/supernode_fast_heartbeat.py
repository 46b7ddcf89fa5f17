"""``flower-supernode`` announcing flwr's shortest heartbeat interval (10 s) instead of its default 30 s.

The SuperLink marks a node offline after HEARTBEAT_PATIENCE (2) missed intervals, so a killed site is
noticed after 20 s rather than 60 s. flwr 1.42 has no option for it: the SuperNode reads the constant
``HEARTBEAT_DEFAULT_INTERVAL`` through two module globals, the interval it announces
(``flwr.supernode.fleet_http_connection``) and the one its sender waits by (``flwr.supercore.heartbeat``:
0.7-0.9 × (interval − 5 s) between beats), so this sets both before the SuperNode starts. Used by the
secured loopback deployment's sites only; everything else is the real ``flower-supernode``.
"""

import sys

from flwr.common import constant
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode.cli import flower_supernode

if __name__ == "__main__":
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL  # announced
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = constant.HEARTBEAT_MIN_INTERVAL  # sent every 3.5-4.5 s
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())
