import pytest
import torch

from fedprune.data.sites import pooled_windows, site_window_count, site_windows


def _docs():
    # doc k holds ids 1000k .. 1000k+99, so a window's first id tells its doc
    return {f"w{k}": torch.arange(100) + 1000 * k for k in range(6)}


def test_window_counts_split_evenly():
    assert [site_window_count(10, s, 4) for s in range(4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        site_window_count(3, 0, 4)


def test_by_document_sites_see_disjoint_works():
    docs = _docs()
    seen = []
    for site in range(3):
        windows = site_windows("by_document", docs, site, 3, 9, 10, seed=0)
        assert windows.shape == (3, 10)
        seen.append({int(w[0]) // 1000 for w in windows})
    for a in range(3):
        for b in range(a + 1, 3):
            assert not seen[a] & seen[b]


def test_iid_sites_partition_the_pooled_sample():
    docs = _docs()
    parts = [site_windows("iid", docs, s, 3, 9, 10, seed=1) for s in range(3)]
    assert sum(p.shape[0] for p in parts) == 9
    assert torch.equal(torch.cat(parts), pooled_windows("iid", docs, 3, 9, 10, seed=1))


def test_unknown_partitioner_and_site():
    with pytest.raises(KeyError, match="unknown partitioner"):
        site_windows("nope", _docs(), 0, 2, 4, 10, 0)
    with pytest.raises(ValueError, match="site id"):
        site_windows("iid", _docs(), 2, 2, 4, 10, 0)
