"""The Flower Deployment Engine on loopback: one SuperLink, two SuperNodes and `flwr run` of this repository.

Every process is started in its own session (process group) and stopped by PID at the end; the
teardown fails if any of them, or anything they started, is still running.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from cli.main import run
from fedprune.protocols.secure_site import provision_simulated_identities, simulated_identity_path
from server.server_app import split_overrides

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),  # flwr's FAB build
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NUM_SITES = 2
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 480  # the whole module stays well under 10 minutes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # never `uv sync`, never download
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


@dataclass
class Deployment:
    """A running loopback deployment and what the test needs to drive it."""

    root: Path
    cli_env: dict[str, str]
    site_caches: list[Path]
    roster: Path  # the sites' identity public keys (each SuperNode has its identity in its node config)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start ``command`` as the leader of a new process group, output to ``logs/<name>.log``."""
        log = (self.root / "logs" / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root
        )
        log.close()
        self.processes.append(process)
        return process

    def flwr_run(self, overrides: list[str], out_dir: Path) -> tuple[int, str]:
        """``flwr run <repo> loopback --stream`` with the overrides; its exit code and output."""
        run_config = f'overrides="{" ".join(overrides)}" out-dir="{out_dir}"'
        command = [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream", "--run-config", run_config]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.cli_env,
            start_new_session=True,
            cwd=self.root,
        )
        self.processes.append(process)
        try:
            output, _ = process.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"flwr run hung for {JOB_TIMEOUT_S} s:\n{output.decode()[-3000:]}\n{self.logs()}")
        return process.returncode, output.decode(errors="replace")

    def logs(self, tail: int = 2000) -> str:
        """The end of every process log, for failure messages."""
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)


def _process_tree(processes: list[subprocess.Popen]) -> list[psutil.Process]:
    """The started processes and all their descendants that are alive now."""
    tree = []
    for process in processes:
        try:
            root = psutil.Process(process.pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return tree


def _signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            continue


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(groups: set[int]) -> list[psutil.Process]:
    """Processes of ``groups`` still running (zombies waiting for init do not count)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in groups and _running(process):
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def stop_all(processes: list[subprocess.Popen], grace_s: float = 15.0) -> list[str]:
    """SIGTERM the process groups of ``processes`` (and of their children), wait, SIGKILL what is left.

    Returns a description of every process still running afterwards (empty if all stopped).
    """
    tree = _process_tree(processes)
    own = os.getpgrp()
    groups = {p.pid for p in processes}
    for process in tree:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            continue
    groups.discard(own)
    _signal_groups(groups, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    alive += _group_members(groups)
    if alive:
        _signal_groups(groups, signal.SIGKILL)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=5.0)
    for process in processes:
        try:
            process.wait(timeout=5.0)  # reap our own children
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 10.0
    left = [p for p in tree if _running(p)] + _group_members(groups)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in tree if _running(p)] + _group_members(groups)
    return sorted({f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in left if _running(p)})


def _wait_healthy(port: int, deployment: Deployment) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the SuperLink was not healthy within {START_TIMEOUT_S} s\n{deployment.logs()}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    """A SuperLink and ``NUM_SITES`` SuperNodes (node i holds partition i) on free loopback ports."""
    root = tmp_path_factory.mktemp("deployment")
    (root / "logs").mkdir()
    link_port = _free_port()
    cli_home = root / "home" / "cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    identities = root / "identities"
    roster = provision_simulated_identities(identities, NUM_SITES)  # site-<i>.key, as each site would make
    caches = [root / f"site{i}_cache" for i in range(NUM_SITES)]
    deployment = Deployment(root, _base_env(cli_home), caches, roster)
    try:
        deployment.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
            _base_env(root / "home" / "superlink"),
        )
        _wait_healthy(link_port, deployment)
        for site in range(NUM_SITES):
            env = _base_env(root / "home" / f"site{site}")
            env["FEDPRUNE_CACHE"] = str(deployment.site_caches[site])  # the site's state between rounds
            deployment.start(
                f"supernode{site}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(_free_port()),
                    "--node-config",
                    f"partition-id={site} num-partitions={NUM_SITES} "
                    f'identity-key="{simulated_identity_path(identities, site)}" roster="{roster}"',
                ],
                env,
            )
        yield deployment
    finally:
        left = stop_all(deployment.processes)
        assert not left, f"processes left running: {left}"


def _overrides(tiny_assets) -> list[str]:
    return [
        "protocol=stats_sync",
        "pruner=wanda",
        f"model.path={tiny_assets['model']}",
        "model.name='tiny llama'",  # a quoted value with a space
        f"data.path={tiny_assets['corpus']}",
        "data.heldout=[hamlet,macbeth]",
        "data.seq_len=16",
        "data.calib_windows=8",
        "data.eval_windows=4",
        f"federation.num_clients={NUM_SITES}",
        "batch_size=4",
        "progress=false",
    ]


def _prunable_weights(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_split_overrides_keeps_brackets_and_quotes_whole():
    text = "a=[x, y]  b='p q' c=\"r s\" d={k: [1, 2]} e=f=g"
    assert split_overrides(text) == ["a=[x, y]", "b='p q'", 'c="r s"', "d={k: [1, 2]}", "e=f=g"]
    assert split_overrides("  ") == []


def test_fab_holds_only_code_and_config():
    """The bundle `flwr run` ships: under 10 MB, no tests, venv, outputs or data."""
    import tomli
    from flwr.cli.build import build_fab_from_files, get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    config = tomli.loads((ROOT / "pyproject.toml").read_text())
    files = collect_files(ROOT)
    paths = get_filtered_fab_paths(filter_paths_for_publish(files), config)
    tops = {p.split("/")[0] for p in paths}
    assert tops == {"fedprune", "clients", "server", "cli", "conf"}, tops
    assert "server/server_app.py" in paths and "conf/config.yaml" in paths
    assert len(build_fab_from_files(files)[0]) < 10 * 1024 * 1024


def test_stats_sync_job_runs_and_equals_centralized(deployment, tiny_assets, make_cfg, tmp_path):
    overrides = _overrides(tiny_assets)
    out_dir = tmp_path / "deployed"
    start = time.perf_counter()
    code, output = deployment.flwr_run(overrides, out_dir)
    seconds = time.perf_counter() - start
    assert code == 0, f"{output[-3000:]}\n{deployment.logs()}"
    assert (out_dir / "metrics.json").exists(), f"no metrics.json:\n{output[-3000:]}\n{deployment.logs()}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"flwr run took {seconds:.1f} s; rounds {metrics['round_wall_s']}")
    assert metrics["protocol"] == "stats_sync" and metrics["model"] == "tiny llama"
    assert metrics["num_clients"] == NUM_SITES and metrics["rounds"] == 1 + 2 + 1  # start, 2 blocks, finish
    assert metrics["sparsity_actual"] == pytest.approx(0.5)
    assert math.isfinite(metrics["ppl_dense"]) and math.isfinite(metrics["ppl_pruned"])
    assert metrics["rejected"] == [] and metrics["bytes_up_per_client"] > 0
    assert "protocol" in (out_dir / ".hydra" / "config.yaml").read_text()
    # every site ran (its state was written) and deleted its state at `finish`
    for cache in deployment.site_caches:
        assert (cache / "site_state").is_dir() and not any((cache / "site_state").iterdir()), cache

    # stats_sync is exact: the same masks and perplexity as centralized pruning on the pooled windows
    central = run(make_cfg(*overrides, "protocol=centralized"), tmp_path / "central")
    assert metrics["calib_tokens"] == central["calib_tokens"]
    assert metrics["ppl_pruned"] == pytest.approx(central["ppl_pruned"], rel=1e-4)
    expected, got = _prunable_weights(tmp_path / "central" / "model"), _prunable_weights(out_dir / "model")
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name


def test_secagg_runs_authenticated_with_identities_from_node_config(deployment, tiny_assets, tmp_path):
    overrides = [*_overrides(tiny_assets), "privacy=secagg", "privacy.token_bound=100"]
    _, output = deployment.flwr_run(overrides, tmp_path / "no_roster")
    assert "config key 'privacy.roster'" in output, output[-3000:]  # the server refuses to run unsigned
    out_dir = tmp_path / "secagg"
    code, output = deployment.flwr_run([*overrides, f"privacy.roster={deployment.roster}"], out_dir)
    assert code == 0 and (out_dir / "metrics.json").exists(), f"{output[-3000:]}\n{deployment.logs()}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    # start, keys + share for both blocks, mask + consistency + unmask per block, finish
    assert metrics["privacy"] == "secagg" and metrics["rounds"] == 1 + 2 + 3 * 2 + 1
    assert metrics["num_clients"] == NUM_SITES and metrics["rejected"] == []
    assert math.isfinite(metrics["ppl_pruned"])


def test_bad_config_fails_fast_with_the_key_named(deployment, tiny_assets, tmp_path):
    out_dir = tmp_path / "bad"
    start = time.perf_counter()
    _, output = deployment.flwr_run([*_overrides(tiny_assets), "sparsity=1.5"], out_dir)
    # flwr 1.42's `flwr run --stream` exits 0 even when the ServerApp raised: the log says it
    assert "ServerApp raised an exception" in output, output[-3000:]
    assert "config key 'sparsity'" in output, output[-3000:]
    assert time.perf_counter() - start < 120
    assert not (out_dir / "metrics.json").exists()


def test_hidenseek_runs_under_deployment(deployment, tmp_path):
    overrides = [
        "protocol=hidenseek",
        f"federation.num_clients={NUM_SITES}",
        "federation.min_clients=1",
        "protocol.rounds=2",
        "protocol.local_epochs=1",
        "protocol.synflow_iterations=5",
        "protocol.alpha=1.0",
        "progress=false",
    ]
    out_dir = tmp_path / "hidenseek"
    code, output = deployment.flwr_run(overrides, out_dir)
    assert code == 0 and (out_dir / "metrics.json").exists(), f"{output[-3000:]}\n{deployment.logs()}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "hidenseek" and len(metrics["accuracy"]) == 1 + 2
    assert all(0.0 <= a <= 1.0 for a in metrics["accuracy"])
    assert (out_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
