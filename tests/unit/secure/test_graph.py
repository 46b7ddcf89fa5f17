import pytest

from fedprune.secure.graph import check_graph, complete_graph, restrict, ring_graph


def test_complete_graph():
    assert complete_graph([3, 1, 2]) == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}


def test_ring_graph_is_regular_and_symmetric():
    graph = ring_graph(range(10), degree=4, seed=0)
    assert all(len(vs) == 4 for vs in graph.values())
    assert check_graph(graph) == graph
    assert graph == ring_graph(range(10), degree=4, seed=0)  # public, reproducible
    assert ring_graph(range(4), degree=4, seed=0) == complete_graph(range(4))
    with pytest.raises(ValueError):
        ring_graph(range(10), degree=3, seed=0)


def test_check_graph_rejects_asymmetry_and_self_loops():
    with pytest.raises(ValueError):
        check_graph({1: {2}, 2: set()})
    with pytest.raises(ValueError):
        check_graph({1: {1}})
    assert restrict({1: frozenset({2, 3}), 2: frozenset({1}), 3: frozenset({1})}, [1, 2]) == {1: {2}, 2: {1}}
