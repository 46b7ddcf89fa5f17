"""HideNseek on Flower, the site's side: rebuild the frozen network from a seed, train locally, reply.

Registered on the shared ClientApp (``clients.client_app.app``) as ``train.hidenseek``. Every message
carries all a site needs (simulation gives clients no run config), so a site keeps no state between
rounds and a site that joins late starts from the current global model:

``config``  variant, model (arch, hidden, init, seed), data (test_fraction, alpha, min_size, seed),
            local training (epochs, lr, momentum, batch_size, init_scale, optimizer), round, num_kept,
            num_total.
``update``  ``mask``: the server's keep-mask over all prunable weights, 1 bit each (absent for dense
            FedAvg, which keeps all); ``codes``: the global signs/codes of the kept weights, 1 bit each
            (supermask variants); or ``weights``: the kept weights as float32 (FedAvg variants).

The frozen random weights are never sent: both ends rebuild them from ``model_seed``. The reply's
``payload`` holds ``codes`` (``ceil(num_kept / 8)`` uint8), ``scores`` (``num_kept`` float32, for
``aggregation=score_average``) or ``weights`` (``num_kept`` float32); ``metrics`` holds
``num_examples``, ``partition_id`` and ``crc``, the CRC-32 of the ``update`` the site trained from.

The wire codec here (:func:`encode_mask`, :func:`decode_mask`, :func:`state_crc`) is shared with the
server (``server/hidenseek_workflow.py``).
"""

from __future__ import annotations

import logging
import zlib
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import app
from fedprune.hidenseek.aggregate import gather_kept, pack_signs, scatter_kept
from fedprune.hidenseek.data import dirichlet_label_partition, load_digits_split
from fedprune.hidenseek.masks_wire import *  # noqa: F401,F403  (placeholder removed below)
