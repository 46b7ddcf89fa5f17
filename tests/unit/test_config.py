"""The typed job: parsing names the bad key; cross-group checks run before any work."""

import pytest

from cli.main import job_of
from fedprune.config import ConfigError, JobConfig
from fedprune.protocols.catalog import validate


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.seq_len=abc"], "data.seq_len"),
        (["save_model=3"], "save_model"),
        (["pattern=2:4", "sparsity=0.6"], "sparsity"),
        (["pattern=unstructured", "sparsity=null"], "sparsity"),
        (["protocol=stats_sync", "device=cuda"], "device"),
        (["protocol=mask_vote", "protocol.group=block"], "protocol.group"),
        (["protocol=mask_vote", "+protocol.groups=row"], "protocol.groups"),
        (["protocol=mask_vote", "protocol.scaling=3"], "protocol.scaling"),
        (["ignore=o_proj"], "ignore"),
        (["protocol.name=gossip"], "protocol.name"),
        (["model.dtype=int8"], "model.dtype"),
        (["threads=0"], "threads"),
    ],
)
def test_bad_config_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(job_of(make_cfg(*overrides)))


def test_n_m_pattern_takes_its_own_sparsity(make_cfg):
    validate(job_of(make_cfg("pattern=2:4")))  # the default 0.5 agrees with 2:4
    validate(job_of(make_cfg("pattern=1:4", "sparsity=null")))
    with pytest.raises(ConfigError, match="sparsity=0.75"):
        validate(job_of(make_cfg("pattern=1:4")))


def test_device_reaches_only_protocols_that_use_it(make_cfg):
    validate(job_of(make_cfg("protocol=centralized", "device=cpu")))
    job = job_of(make_cfg("protocol=centralized", "device=cuda"))
    assert job.device == "cuda"  # centralized prunes where the user asks (no site involved)


def test_parsing_is_typed():
    job = JobConfig.from_mapping(
        {"protocol": {"name": "centralized"}, "data": {"seq_len": "16", "heldout": ["a"]}, "ignore": ["*.x"]}
    )
    assert job.data.seq_len == 16 and job.data.heldout == ("a",) and job.ignore == ("*.x",)
    assert job.protocol_name == "centralized" and job.protocol == {}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["allocation=erk"], "allocation"),
        (["allocation=owl", "owl.m=0"], "owl.m"),
        (["allocation=owl", "owl.lambda=0.7"], "owl.lambda"),
        (["allocation=owl", "+owl.M=3"], "owl.M"),
        (["allocation=owl", "pattern=2:4", "sparsity=null"], "allocation"),
        (["allocation=owl", "pruner=magnitude"], "allocation"),
        (["allocation=owl", "sparsity=0.995"], "sparsity"),
    ],
)
def test_bad_allocation_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(job_of(make_cfg(*overrides)))
