"""Secure aggregation in real Flower simulations (3 sites, tiny Llama with 2 blocks).

Every message the server receives is recorded (a grid wrapper in the ServerApp's process) and checked
against each site's plain payload from a ``privacy=none`` run of the same job. Secure runs are
authenticated as through the CLI: the launcher makes one identity per site and the roster.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

import fedprune.protocols.llm_site as real
import fedprune.protocols.secure_site as real_secagg
from cli.main import job_of
from cli.simulation import simulation_launcher, with_site_identities
from clients.client_app import build_app
from fedprune.protocols.catalog import SITE_TASKS, validate
from fedprune.protocols.federation import FederationError
from fedprune.protocols.secure_sums import SecureAggregationError, plan_from_job
from fedprune.protocols.tasks import Site
from fedprune.secure.codec import encode_stats_vector
from tests.recording import RecordingTransport

pytestmark = pytest.mark.integration

FED = ["federation.num_clients=3", "federation.min_clients=2", "data.calib_windows=12"]
SECAGG = ["privacy=secagg", "privacy.threshold=2", "privacy.token_bound=100"]


def _run(cfg, out_dir, app=None, log=None):
    job, identities = with_site_identities(job_of(cfg), out_dir)
    unit = validate(job)
    launch = simulation_launcher(job.federation, app, identities)
    if log is not None:
        inner = launch

        def launch(server_main):
            def recorded(fed):
                fed.transport = RecordingTransport(fed.transport, log)
                server_main(fed)

            inner(recorded)

    return unit.run(job, out_dir, launch)


def _weights(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def _arrays(reply):
    return list(reply.arrays.values())


def _assert_same_masks(expected_dir, got_dir, atol=1e-5):
    expected, got = _weights(expected_dir), _weights(got_dir)
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name
        assert torch.allclose(expected[name], got[name], atol=atol, rtol=1e-4), name


def test_server_sees_only_masked_stats_and_result_equals_plain(make_cfg, tmp_path):
    plain_log, secure_log = [], []
    plain_cfg = make_cfg("pruner=sparsegpt", "protocol=stats_sync", *FED)
    secure_cfg = make_cfg("pruner=sparsegpt", "protocol=stats_sync", *FED, *SECAGG)
    plain = _run(plain_cfg, tmp_path / "plain", log=plain_log)
    secure = _run(secure_cfg, tmp_path / "secure", log=secure_log)
    assert secure["privacy"] == "secagg" and plain["privacy"] == "none"
    # start, key agreement for both blocks (keys, share), mask + consistency + unmask per block, finish
    assert secure["rounds"] == 1 + 2 + 3 * 2 + 1 and not secure["rejected"]
    signatures = [r for _, _, r in secure_log if set(r.arrays) == {"signature"}]
    assert len(signatures) == 3 * 2 and all(r.arrays["signature"].size == 64 for r in signatures)
    _assert_same_masks(tmp_path / "plain" / "model", tmp_path / "secure" / "model")
    assert secure["ppl_pruned"] == pytest.approx(plain["ppl_pruned"], rel=1e-5)

    # each site's plain payload per block, and its encoding as the site would mask it
    model = AutoModelForCausalLM.from_pretrained(str(secure_cfg.model.path))
    plan = plan_from_job(job_of(secure_cfg), model)
    plain_payloads = [dict(r.arrays) for task, _, r in plain_log if task == "train.stats"]
    assert len(plain_payloads) == 3 * 2
    encoded = [encode_stats_vector(dict(p), plan.value_code(), plan.count_code()) for p in plain_payloads]
    floats = [a for p in plain_payloads for k, a in p.items() if k.startswith("total.")]
    received = [a for _, _, r in secure_log for a in _arrays(r)]
    masked = [r.arrays["masked"] for _, _, r in secure_log if "masked" in r.arrays]
    assert len(masked) == 3 * 2
    for array in received:
        for value in floats:  # no plain statistic, in any array of any message
            assert not (array.nbytes >= value.nbytes and value.tobytes() in array.tobytes())
        for vector in encoded:  # no encoded plain vector, not even one word in place
            assert not (array.shape == vector.shape and (array == vector).any())
    for vector in masked:  # one site's masked words look uniform: bytes and bits
        counts = np.bincount(vector.view(np.uint8), minlength=256)
        assert chisquare(counts).pvalue > 1e-4
        bits = np.unpackbits(vector.view(np.uint8)).reshape(-1, 64).mean(axis=0)
        assert np.all(np.abs(bits - 0.5) < 6 * 0.5 / np.sqrt(len(vector)))
    plain_bytes = np.concatenate([v.view(np.uint8) for v in encoded])  # the test has power
    assert chisquare(np.bincount(plain_bytes, minlength=256)).pvalue < 1e-10


def test_mask_vote_sync_secagg_equals_plain_votes(make_cfg, tmp_path):
    args = ["pruner=wanda", "protocol=mask_vote_sync", "protocol.scaling=true", *FED]
    plain = _run(make_cfg(*args), tmp_path / "plain")
    secure = _run(make_cfg(*args, *SECAGG), tmp_path / "secure")
    assert not secure["rejected"] and secure["num_clients"] == 3
    expected, got = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "secure" / "model")
    for name in expected:  # exact vote counts: identical masks and identical scaled weights
        assert torch.equal(expected[name], got[name]), name
    assert secure["bytes_up_per_client"] > plain["bytes_up_per_client"]


def test_mask_vote_one_shot_secagg_equals_plain(make_cfg, tmp_path):
    args = ["pruner=wanda", "protocol=mask_vote", "protocol.group=row", *FED]
    _run(make_cfg(*args), tmp_path / "plain")
    secure = _run(make_cfg(*args, *SECAGG), tmp_path / "secure")
    assert secure["rounds"] == 5 and secure["num_clients"] == 3  # keys, share, mask, consistency, unmask
    expected, got = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "secure" / "model")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# Site 0 fails after sharing its keys (a SecAgg dropout), site 1 sends a masked vector one word too long,
# site 2 one with a word outside the modulus 2^62.
def _faulty(site, request, wrong_length: bool = True):
    stage = str(request.config["secagg.stage"])
    first = int(request.config["block"]) == 0
    # the 5-site test keeps t=2 so that 2 survivors suffice: below the sites' honest-majority floor
    minority = Site(site.node_id, {**site.node_config, "secagg-honest-majority": False})
    reply = real_secagg.secagg(minority, request)
    index = site.node_config["partition-id"]
    if index == 0 and first and stage == "mask":
        raise RuntimeError("site 0 went away")
    if wrong_length and index == 1 and first and stage == "mask":
        masked = reply.arrays["masked"]
        reply.arrays["masked"] = np.concatenate([masked, masked[:1]])
    if wrong_length and index == 2 and first and stage == "mask":
        masked = reply.arrays["masked"].copy()
        masked[0] = np.uint64(1 << 62)
        reply.arrays["masked"] = masked
    return reply


BASE = {"query.start": real.start, "query.finish": real.finish}
faulty_app = build_app({**BASE, "train.secagg": _faulty})
drop_app = build_app(
    {**BASE, "train.secagg": lambda site, request: _faulty(site, request, wrong_length=False)}
)


# the plain reference: sites 0, 1 and 2 fail at block 0, so both blocks are pruned from sites 3 and 4
def _plain_drop(site, request):
    if site.node_config["partition-id"] in (0, 1, 2):
        raise RuntimeError("site went away")
    return SITE_TASKS["train.stats"](site, request)


plain_drop_app = build_app({**BASE, "train.stats": _plain_drop})


def test_survivors_sum_after_a_dropout_and_a_bad_vector(make_cfg, tmp_path):
    args = ["pruner=wanda", "protocol=stats_sync", "federation.num_clients=5", "federation.min_clients=2"]
    args.append("federation.partitioner=iid")  # the tiny corpus has 4 calibration works
    args.append("data.calib_windows=15")
    plain = _run(make_cfg(*args), tmp_path / "plain", plain_drop_app)
    secure = _run(make_cfg(*args, *SECAGG, "privacy.modulus_bits=62"), tmp_path / "secure", faulty_app)  # t=2
    reasons = sorted(r["reason"] for r in secure["rejected"])
    assert len(reasons) == 3 and "client error" in reasons[0], reasons
    assert any("shape (" in r for r in reasons) and any("modulus" in r for r in reasons), reasons
    # metrics report the sites whose data entered the sums: sites 3 and 4 (3 windows of 16 tokens each)
    assert secure["num_clients"] == plain["num_clients"] == 2
    assert secure["calib_tokens"] == plain["calib_tokens"] == 2 * 3 * 16
    _assert_same_masks(tmp_path / "plain" / "model", tmp_path / "secure" / "model")


def test_more_dropouts_than_the_threshold_allows_stop_without_output(make_cfg, tmp_path):
    cfg = make_cfg("pruner=wanda", "protocol=stats_sync", *FED, *SECAGG[:2], "privacy.threshold=3")
    with pytest.raises(FederationError) as error:
        _run(cfg, tmp_path, drop_app)  # n=3, t=3: one dropout is one too many
    assert isinstance(error.value, SecureAggregationError) and "need" in str(error.value)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model").exists()


def test_secagg_dp_reports_its_privacy_and_completes(make_cfg, tmp_path):
    args = ["pruner=sparsegpt", "protocol=stats_sync", *FED, "privacy=secagg_dp", "privacy.epsilon=4"]
    metrics = _run(make_cfg(*args, "privacy.token_bound=0.5", "privacy.delta=1e-6"), tmp_path)
    assert metrics["privacy"] == "secagg_dp" and metrics["dp_delta"] == 1e-6
    assert metrics["dp_epsilon"] == pytest.approx(4.0) and metrics["dp_sigma"] > 0
    assert metrics["sparsity_actual"] == pytest.approx(0.5, abs=0.01) and np.isfinite(metrics["ppl_pruned"])
