"""The coordinator killed for real: a Flower simulation (3 sites, tiny Llama with 2 blocks) in its own
process is SIGKILLed once the checkpoint of block 0 exists (its sites hang in block 1); the same job with
``resume=true`` in a new simulation (new node ids, sites that kept their state on disk) writes the model
an uninterrupted run writes, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cli.main import run
from clients.client_app import build_app
from fedprune.checkpoint import checkpoint_dir
from fedprune.protocols.catalog import SITE_TASKS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FED = ["federation.num_clients=3", "federation.min_clients=2", "data.calib_windows=12"]
SECAGG = ["privacy=secagg", "privacy.threshold=2", "privacy.token_bound=100"]


def _hang_in_block_1(task):
    def handle(site, request):
        if request.config.get("block") == 1 and request.config.get("secagg.stage", "mask") == "mask":
            time.sleep(600)  # the coordinator is killed meanwhile
        return task(site, request)

    return handle


def _app():
    """The fedprune ClientApp, but every site hangs in block 1."""
    tasks = dict(SITE_TASKS)
    for name in ("train.stats", "train.secagg"):
        tasks[name] = _hang_in_block_1(tasks[name])
    return build_app(tasks)


def killed_run(config_path: str, out_dir: str) -> None:
    """The subprocess: the job of ``config_path`` in a Flower simulation whose sites hang in block 1."""
    run(OmegaConf.load(config_path), Path(out_dir), _app())


def _kill_after_block_0(cfg, out_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(OmegaConf.to_yaml(cfg))
    code = (
        "import sys; from tests.integration.test_resume_flower import killed_run; killed_run(*sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(config), str(out_dir)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes its Ray workers too
    )
    state = checkpoint_dir(out_dir) / "state.json"
    try:
        deadline = time.monotonic() + 300
        while not (state.exists() and json.loads(state.read_text())["blocks"] == [0]):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of block 0 within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        log.close()
    assert not (out_dir / "metrics.json").exists()


@pytest.mark.parametrize("privacy", ["none", "secagg"])
def test_killed_coordinator_resumes_to_the_same_model(make_cfg, tmp_path, privacy):
    args = ["pruner=sparsegpt", "protocol=stats_sync", *FED, *(SECAGG if privacy == "secagg" else [])]
    reference = run(make_cfg(*args), tmp_path / "reference")
    out = tmp_path / "run"
    _kill_after_block_0(make_cfg(*args), out, tmp_path)
    resumed = run(make_cfg(*args, "resume=true"), out)
    expected = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    got = load_file(out / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed["ppl_pruned"] == reference["ppl_pruned"] and resumed["num_clients"] == 3
    assert not checkpoint_dir(out).exists()
