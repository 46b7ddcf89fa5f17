"""Secure aggregation: the server learns only the sum of the clients' vectors.

A SecAgg+-style protocol (Bonawitz et al. 2017; Bell et al. 2020) over integers modulo 2^k, built only
from the ``cryptography`` package's primitives: X25519, HKDF-SHA256, AES-GCM, AES-256-CTR as a PRG, plus
Shamir sharing over GF(2^521 - 1). No Flower here: the parties are plain objects exchanging plain-data
messages, one method per round, so any transport can carry them.

Usage: encode floats with ``FixedPoint`` (and counts with ``IntegerCode``), concatenate everything one
client sends into ONE 1-D uint64 vector per protocol instance (masks are single-use), run the rounds
(``run_secure_sum`` does it in process), and decode the sum with the same codes.
"""

from fedprune.secure.client import SecAggClient
from fedprune.secure.driver import ReceivedMessage, SecureSumResult, run_secure_sum
from fedprune.secure.encoding import FixedPoint, IntegerCode, TwoLimbFixedPoint, moment_clip
from fedprune.secure.graph import complete_graph, ring_graph
from fedprune.secure.messages import (
    EncryptedShare,
    InvalidMessageError,
    KeyAdvert,
    MaskedInput,
    SecAggError,
    SurvivorSignature,
    TooFewSurvivorsError,
    UnmaskReply,
    UnmaskRequest,
    message_nbytes,
)
from fedprune.secure.server import SecAggServer, validate_masked_input

__all__ = [
    "EncryptedShare",
    "FixedPoint",
    "IntegerCode",
    "InvalidMessageError",
    "KeyAdvert",
    "MaskedInput",
    "ReceivedMessage",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "SecureSumResult",
    "SurvivorSignature",
    "TooFewSurvivorsError",
    "TwoLimbFixedPoint",
    "UnmaskReply",
    "UnmaskRequest",
    "complete_graph",
    "message_nbytes",
    "moment_clip",
    "ring_graph",
    "run_secure_sum",
    "validate_masked_input",
]
