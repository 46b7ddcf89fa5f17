"""Protocols: one module per federation method (its options, server routine, site tasks, metrics),
written against :class:`fedprune.protocols.federation.Federation` (no Flower, no Hydra).
:mod:`fedprune.protocols.catalog` registers them all."""
