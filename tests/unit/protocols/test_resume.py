"""``resume=true``: the coordinator is killed after a block's checkpoint (or in the middle of the next
block); the same command with ``resume=true`` gives the uninterrupted run's model, bit for bit.

The federated runs use the real site tasks in this process (no Flower); the sites keep their state on
disk under the run key, and one may lose it (its folder deleted) before the resume.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from cli.main import job_of
from fedprune.checkpoint import checkpoint_dir
from fedprune.config import ConfigError
from fedprune.protocols import centralized
from fedprune.protocols.catalog import validate
from fedprune.protocols.federation import Federation
from fedprune.protocols.site_state import reserve_instances, secagg_mark
from fedprune.protocols.tasks import InProcessTransport, Site, in_process_launcher
from tests.tiny_models import VOCAB, tiny_tokenizer

UNAUTHENTICATED = {"secagg-unauthenticated": True}  # in-process sites have no identities
FED = ["federation.num_clients=3", "federation.min_clients=2", "data.calib_windows=12"]
SECAGG = ["privacy=secagg", "privacy.threshold=2", "privacy.token_bound=100"]
PER_BLOCK = ("train.stats", "train.secagg")


class Killed(RuntimeError):
    """The coordinator stops here (as if its process were killed)."""


class KillingTransport(InProcessTransport):
    """Runs the site tasks (recording ``(task, node)`` in ``log``), but kills the coordinator at the first
    per-block round of block ``block`` (None: never): before it reaches the sites (``after`` False) or
    once they have answered it."""

    def __init__(self, sites, block: int | None, after: bool, log: list, kill_task: str = ""):
        super().__init__(sites)
        self.block, self.after, self.log, self.kill_task = block, after, log, kill_task

    def exchange(self, task, requests, timeout):
        config = next(iter(requests.values())).config
        hit = task in PER_BLOCK and config.get("block") == self.block and "secagg.first" not in config
        hit = hit or task == self.kill_task
        if hit and not self.after:
            raise Killed(f"killed before block {self.block}")
        self.log += [(task, node) for node in requests]
        responses = super().exchange(task, requests, timeout)
        if hit:
            raise Killed(f"killed during block {self.block}")
        return responses


def killing_launcher(
    block: int | None, after: bool = False, log: list | None = None, kill_task: str = "", num_sites: int = 3
):
    def launch(server_main) -> None:
        sites = [
            Site(100 + i, {"partition-id": i, "num-partitions": num_sites, **UNAUTHENTICATED})
            for i in range(num_sites)
        ]
        transport = KillingTransport(sites, block, after, [] if log is None else log, kill_task)
        server_main(Federation(transport, transport.node_ids(), 2))

    return launch


def _run(cfg, out_dir, launch=None):
    job = job_of(cfg)
    return validate(job).run(job, out_dir, launch or in_process_launcher(3, 2))


def _tensors(out_dir) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "model" / "model.safetensors")


def _assert_same_model(expected_dir, got_dir) -> None:
    expected, got = _tensors(expected_dir), _tensors(got_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.fixture
def site_cache(tmp_path, monkeypatch):
    """The sites' state folders under this test's own cache root."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FEDPRUNE_CACHE", str(root))
    return root / "site_state"


OWL = ["allocation=owl", "owl.m=2", "owl.lambda=0.2", "sparsity=0.6"]


@pytest.mark.parametrize(
    ("privacy", "after", "lose", "recipe"),
    [
        ("none", False, False, []),
        ("none", True, True, []),
        ("secagg", False, True, []),
        ("secagg", True, False, []),
        ("none", True, True, OWL),
    ],
    ids=["none-before", "none-during-site-lost", "secagg-before-site-lost", "secagg-during", "owl"],
)
def test_stats_sync_resume_equals_uninterrupted(make_cfg, tmp_path, site_cache, privacy, after, lose, recipe):
    args = [
        "pruner=sparsegpt",
        "protocol=stats_sync",
        *FED,
        *recipe,
        *(SECAGG if privacy == "secagg" else []),
    ]
    reference = _run(make_cfg(*args), tmp_path / "reference")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(make_cfg(*args), out, killing_launcher(1, after))
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert state["blocks"] == [0] and not (out / "metrics.json").exists()
    run_key = state["run_key"]
    if lose:  # site 1 lost its disk: the server starts it again from the checkpointed block 0
        shutil.rmtree(site_cache / f"{run_key}-p1")
    resumed = _run(make_cfg(*args, "resume=true"), out)
    _assert_same_model(tmp_path / "reference", out)
    assert resumed["ppl_pruned"] == reference["ppl_pruned"]
    assert resumed["num_clients"] == 3 and resumed["calib_tokens"] == reference["calib_tokens"]
    assert resumed["resumed_after_block"] == 0 and not resumed["rejected"]
    assert resumed.get("block_sparsity") == reference.get("block_sparsity")
    assert json.loads((out / "sparsity.json").read_text()) == json.loads(
        (tmp_path / "reference" / "sparsity.json").read_text()
    )
    assert not checkpoint_dir(out).exists()  # outputs complete: the checkpoint is gone
    assert not list(site_cache.glob(f"{run_key}-*"))  # query.finish: no site state left


def _three_block_llama(folder, corpus):
    """A tiny random-init Llama with 3 decoder blocks and the corpus's tokenizer, as an HF folder."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tiny_tokenizer([p.read_text() for p in sorted(corpus.glob("*.txt"))]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("privacy", ["none", "secagg"])
def test_a_site_that_lost_its_state_is_moved_through_the_finished_blocks(
    make_cfg, tiny_assets, tmp_path, site_cache, privacy
):
    """Three blocks, killed during block 2: sites 0 and 2 hold block 2's inputs; site 1 lost its state and
    is started again, moved past block 0 (``query.advance``) and past block 1 by the next task."""
    model = _three_block_llama(tmp_path / "llama3", tiny_assets["corpus"])
    args = [f"model.path={model}", "pruner=sparsegpt", "protocol=stats_sync", *FED]
    args += SECAGG if privacy == "secagg" else []
    _run(make_cfg(*args), tmp_path / "reference")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(make_cfg(*args), out, killing_launcher(2, after=True))
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert state["blocks"] == [0, 1]
    shutil.rmtree(site_cache / f"{state['run_key']}-p1")
    log: list = []
    _run(make_cfg(*args, "resume=true"), out, killing_launcher(None, log=log))
    _assert_same_model(tmp_path / "reference", out)
    assert [node for task, node in log if task in ("query.start", "query.advance")] == [101, 101]
    assert sorted(node for task, node in log if task == "query.resume") == [100, 101, 102]


def test_killed_after_the_last_block_resumes_to_the_outputs(make_cfg, tmp_path, site_cache):
    """Every block finished, killed at ``query.finish``: the resumed run only asks the sites, finishes
    them and writes the outputs."""
    args = ["pruner=wanda", "protocol=stats_sync", *FED, *SECAGG]
    _run(make_cfg(*args), tmp_path / "reference")
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(make_cfg(*args), out, killing_launcher(None, kill_task="query.finish"))
    log: list = []
    resumed = _run(make_cfg(*args, "resume=true"), out, killing_launcher(None, log=log))
    _assert_same_model(tmp_path / "reference", out)
    assert sorted({task for task, _ in log}) == ["query.finish", "query.resume"]
    assert resumed["resumed_after_block"] == 1 and resumed["num_clients"] == 3


def test_secagg_resume_keys_fresh_instances(make_cfg, tmp_path, site_cache):
    """Instances 0 and 1 were keyed before the kill; the resumed block uses instance 2 (numbers go on
    after the checkpoint's counter), and a site refuses a number it already keyed."""
    args = ["pruner=wanda", "protocol=stats_sync", *FED, *SECAGG]
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _run(make_cfg(*args), out, killing_launcher(1, after=True))
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert state["state"]["sums"]["next_instance"] == 2
    assert state["state"]["sums"]["last_tokens"] > 0  # block 0's sum: its sites' total tokens
    run_key = state["run_key"]
    assert secagg_mark(run_key, "p0") == 2
    with pytest.raises(ValueError, match="never reused"):
        reserve_instances(run_key, "p0", 1, 1)
    seen = []

    class Recording(InProcessTransport):
        def exchange(self, task, requests, timeout):
            config = next(iter(requests.values())).config
            if "secagg.first" in config:
                seen.append(int(config["secagg.first"]))
            return super().exchange(task, requests, timeout)

    def launch(server_main):
        sites = [Site(100 + i, {"partition-id": i, "num-partitions": 3, **UNAUTHENTICATED}) for i in range(3)]
        transport = Recording(sites)
        server_main(Federation(transport, transport.node_ids(), 2))

    metrics = _run(make_cfg(*args, "resume=true"), out, launch)
    assert seen and min(seen) == 2 and not metrics["rejected"]
    assert metrics["calib_tokens"] == state["state"]["sums"]["last_tokens"]  # the same sites, only the total


def test_centralized_resume_equals_uninterrupted(make_cfg, tmp_path, monkeypatch):
    args = ["pruner=sparsegpt", "protocol=centralized", "allocation=owl", "owl.m=2", "sparsity=0.6", *FED]
    _run(make_cfg(*args), tmp_path / "reference")
    out = tmp_path / "run"
    save = centralized.CentralCheckpoints.save

    def save_then_die(self, index, block, report):
        save(self, index, block, report)
        raise Killed(f"killed after block {index}")

    monkeypatch.setattr(centralized.CentralCheckpoints, "save", save_then_die)
    with pytest.raises(Killed):
        _run(make_cfg(*args), out)
    monkeypatch.setattr(centralized.CentralCheckpoints, "save", save)
    assert json.loads((checkpoint_dir(out) / "state.json").read_text())["blocks"] == [0]
    _run(make_cfg(*args, "resume=true"), out)
    _assert_same_model(tmp_path / "reference", out)


def test_resume_without_a_checkpoint_is_a_clear_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="'resume': no checkpoint"):
        _run(make_cfg("pruner=wanda", "protocol=stats_sync", *FED, "resume=true"), tmp_path)


def test_resume_with_a_different_config_names_the_keys(make_cfg, tmp_path, site_cache):
    args = ["pruner=wanda", "protocol=stats_sync", *FED]
    with pytest.raises(Killed):
        _run(make_cfg(*args), tmp_path, killing_launcher(1, after=False))
    changed = make_cfg(*args, "sparsity=0.6", "data.calib_windows=9", "resume=true")
    with pytest.raises(ConfigError, match="'resume'") as error:
        _run(changed, tmp_path)
    assert "data.calib_windows" in str(error.value) and "sparsity" in str(error.value)
    assert "pruner.name" not in str(error.value)
    metrics = _run(make_cfg(*args), tmp_path)  # a fresh run in the same folder starts over
    assert metrics["ppl_pruned"] > 0 and "resumed_after_block" not in metrics
    assert not checkpoint_dir(tmp_path).exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["protocol=mask_vote_sync"],
        ["protocol=stats_sync", "privacy=secagg_dp", "privacy.epsilon=4", "privacy.delta=1e-6"],
        ["protocol=stats_sync", "pattern=structured", "structured.ffn=0.5"],
    ],
    ids=["mask_vote_sync", "secagg_dp", "structured"],
)
def test_resume_is_refused_where_it_cannot_continue(make_cfg, overrides):
    with pytest.raises(ConfigError, match="'resume'"):
        validate(job_of(make_cfg("pruner=wanda", *FED, *overrides, "resume=true")))


def test_resume_is_a_validated_key(make_cfg):
    with pytest.raises(ConfigError, match="'resume': must be true or false"):
        job_of(make_cfg("protocol=stats_sync", "resume=maybe"))
