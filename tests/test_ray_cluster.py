"""A real two-node Ray cluster on loopback: ``fedpeft simulate`` and ``fedpeft sweep`` run their work on both nodes.

``ray start --head`` and ``ray start --address`` start two Ray nodes on this machine, each
with one CPU, its own ports and a resource naming it; they share the machine's IP, so the
test tells them apart by Ray node id, written by a client mod from inside each client. The
head's temp folder is private to the test, so no other Ray user on the machine attaches to
this cluster by accident, and the finalizer stops both nodes by the process ids they
started (never ``ray stop``, which would stop every Ray instance of this user).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from fedpeft.results import load_results
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow

RAY = shutil.which("ray")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ours(marker: str) -> list[psutil.Process]:
    """Processes whose command line names this cluster's temp folder or head port."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _with_children(procs: list[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and every process below them (a raylet's agents and workers, whose command lines name nothing)."""
    found = list(procs)
    for proc in procs:
        try:
            found += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """``127.0.0.1:<port>`` of a head node and a second node, each with 1 CPU; stopped by PID afterwards."""
    if RAY is None:
        pytest.skip("the ray command is not installed")
    temp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, *p = _free_ports(12)
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false",
            "--resources", '{"fedpeft_head": 1}', "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
            "--ray-client-server-port", str(p[2]), "--dashboard-agent-listen-port", str(p[3]),
            "--metrics-export-port", str(p[4]), "--min-worker-port", "0", "--max-worker-port", "0", *common]  # fmt: skip
    second = [RAY, "start", "--address", address, "--resources", '{"fedpeft_second": 1}',
              "--node-manager-port", str(p[5]), "--object-manager-port", str(p[6]),
              "--dashboard-agent-listen-port", str(p[7]), "--metrics-export-port", str(p[8]),
              "--min-worker-port", "0", "--max-worker-port", "0", *common]  # fmt: skip
    env = {**os.environ, "RAY_worker_niceness": "0"}
    started: list[psutil.Process] = []
    try:
        for cmd in (head, second):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        started = _ours(temp) + _ours(f":{port}")
        yield address
    finally:
        started = {p.pid: p for p in _with_children(started + _ours(temp) + _ours(f":{port}"))}.values()
        for proc in started:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(started), timeout=20)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def record_node(folder: str, msg, context, call_next):
    """A client mod: the Ray node id of the process that handles this message, one file per node."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    Path(folder, node).write_text(str(os.getpid()))
    return call_next(msg, context)


def test_simulate_attaches_to_the_cluster_says_so_and_runs_clients_on_both_nodes(
    ray_cluster, tmp_path, monkeypatch, caplog
):
    import ray

    from simulations.run import simulate

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    cfg = tiny_config(**{"partition.num-partitions": 2, "simulation.num-cpus-per-client": 1.0, "num-rounds": 2})
    with caplog.at_level("INFO", logger="fedpeft"):
        results = load_results(
            simulate(cfg, tmp_path / "run", plot=False, client_mods=[functools.partial(record_node, str(nodes))])
        )
    assert results["status"] == "completed"
    assert any("attaching to the running cluster at" in r.getMessage() for r in caplog.records)
    ray.init(address=ray_cluster)
    try:
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert len(cluster_nodes) == 2
    assert {p.name for p in nodes.iterdir()} == cluster_nodes  # clients ran on the head and on the second node


def test_a_sweep_with_ray_address_spreads_its_runs_over_both_nodes(ray_cluster, tmp_path):
    import ray

    from simulations.run import main

    config = tmp_path / "tiny.toml"
    flat = tiny_config(**{"partition.num-partitions": 2, "num-rounds": 1}).to_flat()
    config.write_text("\n".join(f'"{k}" = {json.dumps(v)}' for k, v in flat.items()) + "\n")
    out = tmp_path / "sweep"
    argv = ["sweep", str(config), "--seeds", "0-1", "--jobs", "2", "--ray-address", ray_cluster, "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    ray.init(address=ray_cluster)
    try:
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert {r["ray_node"] for r in runs} == cluster_nodes  # one run on each node (1 CPU each, 1 CPU per run)
