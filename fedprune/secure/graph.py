"""Communication graphs: which clients exchange pairwise masks and hold each other's secret shares.

Bonawitz et al. (2017) use the complete graph (cost O(n²) key agreements and PRG expansions). SecAgg+
(Bell et al. 2020) uses a sparse graph of degree ~O(log n) built from public randomness; here the
Harary-style ring: clients in a publicly seeded random order, each joined to its ``degree / 2`` nearest
neighbours on either side. Graphs are ``{client: frozenset(neighbours)}``, symmetric, without self-loops.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import numpy as np

logger = logging.getLogger(__name__)

Graph = dict[int, frozenset[int]]


def complete_graph(clients: Collection[int]) -> Graph:
    """Every client is a neighbour of every other."""
    ids = frozenset(clients)
    return {u: ids - {u} for u in ids}


def ring_graph(clients: Collection[int], degree: int, seed: int) -> Graph:
    """A ``degree``-regular ring over a public, seeded permutation of the clients (even ``degree``).

    Falls back to the complete graph when ``degree >= len(clients) - 1``.
    """
    ids = sorted(set(clients))
    if degree < 2 or degree % 2:
        raise ValueError(f"ring degree must be an even number >= 2, got {degree}")
    if degree >= len(ids) - 1:
        return complete_graph(ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n, half = len(order), degree // 2
    return {
        order[i]: frozenset(order[(i + step) % n] for step in range(-half, half + 1) if step != 0)
        for i in range(n)
    }


def check_graph(neighbours: Mapping[int, Collection[int]]) -> Graph:
    """Validate a graph (symmetric, no self-loops, known endpoints) and return it with frozensets."""
    graph = {int(u): frozenset(int(v) for v in vs) for u, vs in neighbours.items()}
    for u, vs in graph.items():
        if u in vs:
            raise ValueError(f"client {u} is listed as its own neighbour")
        for v in vs:
            if v not in graph or u not in graph[v]:
                raise ValueError(f"graph is not symmetric: {u} -> {v} without {v} -> {u}")
    return graph


def restrict(graph: Mapping[int, frozenset[int]], clients: Collection[int]) -> Graph:
    """The subgraph induced by ``clients``."""
    keep = frozenset(clients)
    return {u: graph[u] & keep for u in keep}
