"""The typed site message schema: round trips, errors that name the key, and the wire kept as it was."""

import pytest

from fedprune.protocols.messages import BlockTask, MessageError, MethodSpec, SiteJob

JOB = SiteJob(
    run_key="abc",
    model="/m",
    dtype="float32",
    corpus="shakespeare",
    heldout=("hamlet", "macbeth"),
    seq_len=16,
    total_windows=12,
    partitioner="by_document",
    num_sites=3,
    seed=0,
    batch_size=4,
)


def test_site_job_round_trip_and_the_keys_sites_always_received():
    record = JOB.to_record()
    # the flat keys of the record every site got before the typed schema (the bytes on the wire stay)
    assert list(record) == [
        "run_key",
        "model",
        "dtype",
        "corpus",
        "heldout",
        "seq_len",
        "total_windows",
        "partitioner",
        "num_sites",
        "seed",
        "batch_size",
    ]
    assert record["heldout"] == ["hamlet", "macbeth"]
    assert SiteJob.from_record(record) == JOB


def test_ignore_travels_only_when_given():
    job = SiteJob(**{**JOB.__dict__, "ignore": ("*.o_proj",)})
    record = job.to_record()
    assert record["ignore"] == ["*.o_proj"]
    assert SiteJob.from_record(record) == job and SiteJob.from_record(JOB.to_record()).ignore == ()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seq_len": None}, "seq_len"),
        ({"seq_len": "many"}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"heldout": "hamlet"}, "heldout"),
        ({"num_sites": 13}, "total_windows"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_a_bad_site_job_record_names_the_key(change, key):
    record = {**JOB.to_record(), **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(MessageError, match=f"'{key}'"):
        SiteJob.from_record(record)


def test_method_and_block_records():
    method = MethodSpec("sparsegpt", {"percdamp": 0.01, "blocksize": 128}, 0.5, "2:4", "hessian")
    record = method.to_record()
    assert record["pruner_params"] == '{"percdamp": 0.01, "blocksize": 128}'
    assert MethodSpec.from_record(record) == method
    with pytest.raises(MessageError, match="'pruner_params'"):
        MethodSpec.from_record({**record, "pruner_params": "{"})
    with pytest.raises(MessageError, match="'sparsity'"):
        MethodSpec.from_record({**record, "sparsity": 1.0})
    assert BlockTask.from_record(BlockTask(3, "weights").to_record()) == BlockTask(3, "weights")
    with pytest.raises(MessageError, match="'update_kind'"):
        BlockTask.from_record({"block": 1, "update_kind": "deltas"})
    with pytest.raises(MessageError, match="'block'"):
        BlockTask.from_record({"update_kind": "masks"})


def test_records_of_a_data_free_method_are_valid_flower_config_records():
    """Flower cannot count (so cannot send) an empty string: a data-free pruner has no statistic."""
    from flwr.app import ConfigRecord

    method = MethodSpec("magnitude", {}, 0.5, "unstructured", "")
    record = {**JOB.to_record(), **method.to_record(), **BlockTask(0).to_record()}
    assert "stat_kind" not in record and ConfigRecord(record).count_bytes() > 0
    assert MethodSpec.from_record(record) == method


def test_block_tasks_of_depth_pruning_round_trip_as_flower_records():
    from flwr.app import ConfigRecord

    task = BlockTask(3, "structured", removed_blocks=(1, 2), removed_attention=(0, 5))
    record = task.to_record()
    assert ConfigRecord(record).count_bytes() > 0 and BlockTask.from_record(record) == task
    assert task.previous == 0 and BlockTask(4, removed_blocks=(3,)).previous == 2
    assert BlockTask(2).to_record() == {"block": 2, "update_kind": "masks"}  # unstructured: unchanged
    influence = BlockTask(0, task="influence")
    assert BlockTask.from_record(influence.to_record()) == influence
    for bad in (
        {"block": 1, "update_kind": "masks", "task": "steal"},
        {"block": 1, "update_kind": "masks", "removed_blocks": [1]},
        {"block": 1, "update_kind": "masks", "removed_blocks": [0], "removed_attention": [0]},
        {"block": 1, "update_kind": "masks", "removed_blocks": "0"},
    ):
        with pytest.raises(MessageError):
            BlockTask.from_record(bad)


def test_structured_fractions_travel_only_with_pattern_structured(make_cfg):
    from cli.main import job_of
    from fedprune.config import build_pruner

    plain = MethodSpec("wanda", {}, 0.5, "unstructured", "sq_norm")
    assert list(plain.to_record()) == ["pruner", "pruner_params", "sparsity", "pattern", "stat_kind"]
    job = job_of(make_cfg("pattern=structured", "structured.ffn=0.5", "pruner=wanda"))
    method = MethodSpec.from_job(job, build_pruner(job.pruner))
    assert (method.pattern, method.structured_ffn, method.structured_heads) == ("structured", 0.5, 0.0)
    record = method.to_record()
    assert record["structured_ffn"] == 0.5 and record["structured_heads"] == 0.0
    assert MethodSpec.from_record(record) == method
    with pytest.raises(MessageError, match="missing key 'structured_heads'"):
        MethodSpec.from_record({k: v for k, v in record.items() if k != "structured_heads"})
    for bad in (
        {**plain.to_record(), "structured_ffn": 0.5},  # not with another pattern
        {**record, "structured_ffn": 1.0},
    ):
        with pytest.raises(MessageError, match="'structured_ffn'"):
            MethodSpec.from_record(bad)
