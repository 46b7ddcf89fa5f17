"""A site's calibration windows: a real site (its own folder) draws its share as a simulated site does."""

import pytest

from fedprune.data.sites import site_window_count
from fedprune.protocols.llm_site import calibration_ids
from fedprune.protocols.messages import SiteJob
from fedprune.protocols.tasks import Site


def _job(tiny_assets, total=11, sites=3):
    return SiteJob(
        run_key="k",
        model=str(tiny_assets["model"]),
        dtype="float32",
        corpus=str(tiny_assets["corpus"]),
        heldout=("hamlet", "macbeth"),
        seq_len=16,
        total_windows=total,
        partitioner="by_document",
        num_sites=sites,
        seed=0,
        batch_size=4,
    )


def test_a_real_site_draws_its_share_of_the_windows_like_a_simulated_one(tiny_assets):
    job = _job(tiny_assets)
    counts = [
        calibration_ids(job, Site(7, {"data-path": str(tiny_assets["corpus"]), "partition-id": i})).shape[0]
        for i in range(3)
    ]
    simulated = [
        calibration_ids(job, Site(7, {"partition-id": i, "num-partitions": 3})).shape[0] for i in range(3)
    ]
    assert counts == simulated == [site_window_count(11, i, 3) for i in range(3)] == [4, 4, 3]
    ids = calibration_ids(job, Site(7, {"data-path": str(tiny_assets["corpus"]), "partition-id": 0}))
    assert ids.shape == (4, 16)


def test_a_real_site_without_its_index_or_with_a_wrong_one_is_refused(tiny_assets):
    job = _job(tiny_assets)
    with pytest.raises(ValueError, match="partition-id"):
        calibration_ids(job, Site(7, {"data-path": str(tiny_assets["corpus"])}))
    with pytest.raises(ValueError, match="outside"):
        calibration_ids(job, Site(7, {"data-path": str(tiny_assets["corpus"]), "partition-id": 3}))
    with pytest.raises(ValueError, match="num-partitions"):
        calibration_ids(job, Site(7, {"partition-id": 0, "num-partitions": 4}))
