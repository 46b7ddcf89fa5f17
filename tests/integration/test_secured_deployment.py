"""The secured Deployment Engine setup of README "Multi-site deployment", on loopback, and its refusals.

One SuperLink with TLS (a CA and a server certificate made by ``scripts/make_deployment_keys.py`` with
`cryptography`) and SuperNode authentication (site keys registered with ``flwr supernode register``),
bound to 127.0.0.1 only; the sites reach it through ``scripts/fleet_proxy.py`` on 127.0.0.2, which
forwards only the Fleet API, so the Control API (`flwr run`, `flwr supernode register`) stays on
loopback. Three SuperNodes. Tests, in order:

- the job runs end to end and saves a pruned model that loads;
- a SuperNode with an unregistered key cannot join; one without the CA certificate (system CAs, another
  CA, or plain HTTP) is refused; the Control API is unreachable through the public address;
- a SuperNode with ``--trusted-entities`` refuses the (unsigned) bundle `flwr run` ships: flwr 1.42 has
  no way to sign a locally built FAB (only Flower Hub apps carry signatures), see README;
- a site killed mid-run (after the first block's round): the run completes with the other two and
  metrics.json says whose data entered each block.

Every process runs in its own session and is stopped by PID at teardown (``stop_all``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from cli.main import run
from tests.integration.test_deployment import (
    BIN,
    ROOT,
    _base_env,
    _free_port,
    _prunable_weights,
    stop_all,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning"),
]

NUM_SITES = 3
PUBLIC_HOST = "127.0.0.2"  # stands for the coordinator's public interface
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 300
REFUSAL_TIMEOUT_S = 60


def _connection_toml(name: str, address: str, root_certificates: Path | None) -> str:
    tls = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = false"
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{tls}\n'


@dataclass
class Secured:
    """A running secured loopback deployment."""

    root: Path
    keys: Path
    link_port: int
    proxy_port: int
    cli_env: dict[str, str]
    node_ids: dict[str, int] = field(default_factory=dict)  # site key name -> registered node id
    sites: dict[str, subprocess.Popen] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def public_address(self) -> str:
        return f"{PUBLIC_HOST}:{self.proxy_port}"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with self.log(name).open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root
            )
        self.processes.append(process)
        return process

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
        """A `flwr` command (its own session, stopped if it hangs): exit code and output."""
        process = subprocess.Popen(
            [str(BIN / "flwr"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env or self.cli_env,
            start_new_session=True,
            cwd=self.root,
        )
        self.processes.append(process)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"flwr {' '.join(args)} hung:\n{output.decode()[-3000:]}\n{self.logs()}")
        return process.returncode, output.decode(errors="replace")

    def register(self, key_name: str) -> int:
        code, output = self.cli(
            "supernode", "register", str(self.keys / f"{key_name}.pub"), "--format", "json"
        )
        assert code == 0, output
        node_id = int(json.loads(output[output.index("{") :])["node-id"])
        self.node_ids[key_name] = node_id
        return node_id

    def start_site(self, name: str, partition: int, *extra: str, key: str | None = None) -> subprocess.Popen:
        """A SuperNode for partition ``partition`` (of NUM_SITES) through the public address."""
        env = _base_env(self.root / "home" / name)
        env["FEDPRUNE_CACHE"] = str(self.root / f"{name}_cache")
        command = [
            sys.executable,  # flower-supernode with a 10 s heartbeat: a killed site is noticed in 20 s
            str(Path(__file__).with_name("supernode_fast_heartbeat.py")),
            "--superlink",
            self.public_address,
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={partition} num-partitions={NUM_SITES}",
            *(["--auth-supernode-private-key", str(self.keys / key)] if key else []),
            *extra,
        ]
        process = self.start(name, command, env)
        self.sites[name] = process
        return process

    def flwr_run(self, overrides: list[str], out_dir: Path) -> tuple[int, str]:
        run_config = f'overrides="{" ".join(overrides)}" out-dir="{out_dir}"'
        return self.cli("run", str(ROOT), "--stream", "--run-config", run_config, timeout=JOB_TIMEOUT_S)

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}"
            for log in sorted((self.root / "logs").glob("*.log"))
        )

    def node_status(self) -> dict[int, str]:
        code, output = self.cli("supernode", "list", "--format", "json")
        assert code == 0, output
        return {int(n["node-id"]): n["status"] for n in json.loads(output[output.index("{") :])["nodes"]}


def _make_keys(out: Path, sites: int, hosts: list[str]) -> None:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "make_deployment_keys.py"),
        str(out),
        "--sites",
        str(sites),
    ]
    subprocess.run([*command, "--hosts", *hosts], check=True, capture_output=True, timeout=60)


def _wait_healthy(url: str, cafile: Path, deployment: Secured) -> None:
    context = ssl.create_default_context(cafile=str(cafile))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} was not healthy within {START_TIMEOUT_S} s\n{deployment.logs()}")


def _start_secured(root: Path, keys: Path) -> Secured:
    """SuperLink (TLS, SuperNode auth, 127.0.0.1 only) and the Fleet-only proxy on PUBLIC_HOST."""
    (root / "logs").mkdir(parents=True)
    link_port, proxy_port = _free_port(), _free_port()
    cli_home = root / "home" / "cli"
    cli_home.mkdir(parents=True)
    (cli_home / "config.toml").write_text(
        _connection_toml("local", f"127.0.0.1:{link_port}", keys / "ca.crt")
    )
    deployment = Secured(root, keys, link_port, proxy_port, _base_env(cli_home))
    tls = ["--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.crt")]
    deployment.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            *tls,
            "--ssl-keyfile",
            str(keys / "server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        ],
        _base_env(root / "home" / "superlink"),
    )
    deployment.start(
        "fleet_proxy",
        [
            sys.executable,
            str(ROOT / "scripts" / "fleet_proxy.py"),
            "--listen",
            deployment.public_address,
            "--upstream",
            f"127.0.0.1:{link_port}",
            "--certfile",
            str(keys / "server.crt"),
            "--keyfile",
            str(keys / "server.key"),
            "--cafile",
            str(keys / "ca.crt"),
        ],
        _base_env(root / "home" / "proxy"),
    )
    _wait_healthy(f"https://127.0.0.1:{link_port}", keys / "ca.crt", deployment)
    _wait_healthy(f"https://{deployment.public_address}", keys / "ca.crt", deployment)
    return deployment


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """CA, server certificate (127.0.0.1, 127.0.0.2, localhost) and site keys site0..site5."""
    out = tmp_path_factory.mktemp("keys")
    _make_keys(out, 6, ["127.0.0.1", PUBLIC_HOST, "localhost"])
    return out


@pytest.fixture(scope="module")
def secured(keys, tmp_path_factory) -> Iterator[Secured]:
    """The secured deployment with NUM_SITES registered, running sites (site i holds partition i)."""
    deployment = None
    processes: list[subprocess.Popen] = []
    try:
        deployment = _start_secured(tmp_path_factory.mktemp("secured"), keys)
        processes = deployment.processes
        for site in range(NUM_SITES):
            deployment.register(f"site{site}")
            deployment.start_site(
                f"site{site}", site, "--root-certificates", str(keys / "ca.crt"), key=f"site{site}"
            )
        yield deployment
    finally:
        left = stop_all(processes)
        assert not left, f"processes left running: {left}"


def _overrides(tiny_assets, *extra: str) -> list[str]:
    return [
        "protocol=stats_sync",
        "pruner=wanda",
        f"model.path={tiny_assets['model']}",
        "model.name=tiny-llama",
        f"data.path={tiny_assets['corpus']}",
        "data.heldout=[hamlet,macbeth]",
        "data.seq_len=16",
        "data.calib_windows=9",
        "data.eval_windows=4",
        f"federation.num_clients={NUM_SITES}",
        "batch_size=4",
        "progress=false",
        *extra,
    ]


def _wait_exit(process: subprocess.Popen, deployment: Secured, timeout: float = REFUSAL_TIMEOUT_S) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SuperNode was not refused within {timeout} s\n{deployment.logs()}")


def test_secured_job_runs_and_saves_a_loadable_model(secured, tiny_assets, make_cfg, tmp_path):
    overrides = _overrides(tiny_assets)
    out_dir = tmp_path / "secured"
    start = time.perf_counter()
    code, output = secured.flwr_run(overrides, out_dir)
    seconds = time.perf_counter() - start
    assert code == 0 and (out_dir / "metrics.json").exists(), f"{output[-3000:]}\n{secured.logs()}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"secured flwr run took {seconds:.1f} s; rounds {metrics['round_wall_s']}")
    assert metrics["protocol"] == "stats_sync" and metrics["num_clients"] == NUM_SITES
    assert metrics["rounds"] == 1 + 2 + 1 and metrics["rejected"] == []
    assert metrics["sparsity_actual"] == pytest.approx(0.5)
    assert math.isfinite(metrics["ppl_dense"]) and math.isfinite(metrics["ppl_pruned"])
    # every registered site is online and took part; the fleet went through the proxy only
    status = secured.node_status()
    assert {status[secured.node_ids[f"site{i}"]] for i in range(NUM_SITES)} == {"online"}, status
    assert "/v1/fleet/pull-messages" in secured.log("fleet_proxy").read_text()
    # the same masks as centralized pruning on the pooled windows; the saved model loads
    central = run(make_cfg(*overrides, "protocol=centralized"), tmp_path / "central")
    assert metrics["ppl_pruned"] == pytest.approx(central["ppl_pruned"], rel=1e-4)
    expected, got = _prunable_weights(tmp_path / "central" / "model"), _prunable_weights(out_dir / "model")
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name] == 0, got[name] == 0), name


def test_unregistered_site_key_cannot_join(secured, keys):
    process = secured.start_site(
        "unregistered", 0, "--root-certificates", str(keys / "ca.crt"), "--max-retries", "1", key="site3"
    )
    code = _wait_exit(process, secured)
    log = secured.log("unregistered").read_text(errors="replace")
    assert code != 0 and "Failed to activate SuperNode" in log, log[-3000:]
    assert "No SuperNode found with the given public key" in secured.log("superlink").read_text()
    assert set(secured.node_status()) == set(secured.node_ids.values())  # no node for that key


@pytest.mark.parametrize("tls", ["system CAs", "another CA", "plain HTTP"])
def test_site_without_the_ca_certificate_is_refused(secured, keys, tmp_path, tls):
    name = f"no_ca_{tls.replace(' ', '_')}"
    node_id = secured.node_ids.get("site4") or secured.register("site4")  # a registered key: TLS refuses it
    if tls == "another CA":
        _make_keys(tmp_path / "rogue", 0, ["127.0.0.1", PUBLIC_HOST])
        extra = ["--root-certificates", str(tmp_path / "rogue" / "ca.crt")]
    elif tls == "plain HTTP":
        extra = ["--insecure"]
    else:
        extra = []
    process = secured.start_site(
        name, 1, *extra, "--max-retries", "1", key=None if tls == "plain HTTP" else "site4"
    )
    code = _wait_exit(process, secured)
    log = secured.log(name).read_text(errors="replace")
    assert code != 0, log[-3000:]
    if tls != "plain HTTP":
        assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]
    assert secured.node_status()[node_id] == "registered"  # never online


def test_control_api_is_not_reachable_through_the_public_address(secured, keys, tmp_path):
    # the SuperLink itself listens on 127.0.0.1 only
    with pytest.raises(OSError):
        import socket

        socket.create_connection((PUBLIC_HOST, secured.link_port), timeout=2).close()
    # through the proxy only the Fleet API answers: Control API calls get 403 ...
    context = ssl.create_default_context(cafile=str(keys / "ca.crt"))
    request = urllib.request.Request(
        f"https://{secured.public_address}/v1/control/list-runs", data=b"", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5, context=context)
    assert refused.value.code == 403
    # ... so `flwr` pointed at the public address cannot register a key or list (or start) runs
    home = tmp_path / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(_connection_toml("public", secured.public_address, keys / "ca.crt"))
    env = _base_env(home)
    code, output = secured.cli("supernode", "register", str(keys / "site5.pub"), env=env)
    assert code != 0, output
    code, output = secured.cli("ls", env=env)
    assert code != 0, output
    assert "site5" not in secured.node_ids and len(secured.node_status()) == len(secured.node_ids)
    # and without the CA certificate `flwr` does not even connect to the loopback SuperLink
    (home / "config.toml").write_text(_connection_toml("local", f"127.0.0.1:{secured.link_port}", None))
    code, output = secured.cli("ls", env=env)
    assert code != 0 and "Connection to the SuperLink is unavailable" in output, output


@pytest.fixture(scope="module")
def trusting(keys, tmp_path_factory) -> Iterator[Secured]:
    """A secured SuperLink with one SuperNode that runs only bundles signed by a trusted key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    deployment = None
    processes: list[subprocess.Popen] = []
    try:
        root = tmp_path_factory.mktemp("trusting")
        deployment = _start_secured(root, keys)
        processes = deployment.processes
        coordinator = ed25519.Ed25519PrivateKey.generate().public_key()
        public = coordinator.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        trusted = root / "trusted_entities.yaml"
        trusted.write_text(f"fpk_coordinator: '{public.decode()} coordinator'\n")
        deployment.register("site5")
        deployment.start_site(
            "trusting",
            0,
            "--root-certificates",
            str(keys / "ca.crt"),
            "--trusted-entities",
            str(trusted),
            key="site5",
        )
        yield deployment
    finally:
        left = stop_all(processes)
        assert not left, f"processes left running: {left}"


def test_site_with_trusted_entities_refuses_the_unsigned_bundle(trusting, tiny_assets, tmp_path):
    out_dir = tmp_path / "unsigned"
    overrides = _overrides(tiny_assets, "federation.num_clients=1", "federation.min_clients=1")
    overrides = [o for o in overrides if o != f"federation.num_clients={NUM_SITES}"]
    _, output = trusting.flwr_run(overrides, out_dir)
    site_log = trusting.log("trusting").read_text(errors="replace")
    assert "The FAB could not be verified" in site_log, site_log[-3000:]
    assert "ServerApp raised an exception" in output and "fewer than federation.min_clients" in output, (
        output[-3000:]
    )
    assert not (out_dir / "metrics.json").exists()
    assert not (trusting.root / "trusting_cache" / "site_state").exists()  # no site code ran


def _receipts(log: Path) -> int:
    return log.read_text(errors="replace").count("Receiving: ") if log.exists() else 0


def test_site_killed_mid_run_the_others_finish(secured, tiny_assets, tmp_path):
    """site2 is killed (SIGKILL, its process tree by PID) when its first block-1 task arrives."""
    victim = "site2"
    out_dir = tmp_path / "killed"
    before = _receipts(secured.log(victim))
    run_config = (
        f'overrides="{" ".join(_overrides(tiny_assets, "federation.min_clients=2"))}" out-dir="{out_dir}"'
    )
    job = subprocess.Popen(
        [str(BIN / "flwr"), "run", str(ROOT), "--stream", "--run-config", run_config],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=secured.cli_env,
        start_new_session=True,
        cwd=secured.root,
    )
    secured.processes.append(job)
    # tasks of this run: start, block 0, block 1, finish. Kill on the third one's arrival
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _receipts(secured.log(victim)) < before + 3:
        assert job.poll() is None and time.monotonic() < deadline, secured.logs()
        time.sleep(0.02)
    site = psutil.Process(secured.sites[victim].pid)
    tree = [site, *site.children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=10)
    killed_at = time.perf_counter()
    try:
        output, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"flwr run hung after the kill:\n{output.decode()[-3000:]}\n{secured.logs()}")
    output = output.decode(errors="replace")
    print(f"the run finished {time.perf_counter() - killed_at:.1f} s after the kill")
    assert (out_dir / "metrics.json").exists(), f"{output[-3000:]}\n{secured.logs()}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    dead = secured.node_ids[victim]
    alive = sorted(secured.node_ids[f"site{i}"] for i in range(NUM_SITES) if f"site{i}" != victim)
    # block 0's sum holds all three sites, block 1's only the two left; the model is complete
    assert [sorted(sites) for sites in metrics["sites_per_sum"]] == [sorted([*alive, dead]), alive], metrics

    assert metrics["num_clients"] == 2 and metrics["sparsity_actual"] == pytest.approx(0.5)
    print("rejected:", metrics["rejected"])
    # the dead site is recorded in block 1's round (flwr 1.42 answers for a node that missed its heartbeats
    # with an error reply from the SuperLink's own node id: server/flower_transport.py attributes a reply to
    # the node its request went to), and nobody else is
    assert 2 in {r["round"] for r in metrics["rejected"] if r["node"] == dead}, metrics["rejected"]
    assert {r["node"] for r in metrics["rejected"]} == {dead}, metrics["rejected"]
    assert _prunable_weights(out_dir / "model")
