"""Flower's deployment runtime for real, on 127.0.0.1: a TLS SuperLink with SuperNode
authentication, three registered SuperNodes (warm ClientApp workers), ``flwr run`` of the
default experiment on a small slice for two rounds; one SuperNode is killed in round 2.

Every process is started by :class:`simulations.deploy.Loopback` and stopped by PID with
bounded waits in the module fixture's finalizer, also when a test fails.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from simulations.deploy.loopback import CONNECTION, Loopback, wait_for_results
from simulations.deploy.processes import process_alive

pytestmark = pytest.mark.slow

NUM_NODES = 3
KILLED = 2  # partition id of the SuperNode killed at the start of round 2
ROUND_TIMEOUT_S = 90.0
RUN_CONFIG = {
    "name": "deploy-tiny",
    "num-rounds": 2,
    "data.num-train-examples": 96,
    "data.num-test-examples": 64,
    "partition.num-partitions": NUM_NODES,
    "partition.min-partition-size": 8,
    "participation.model": "always",
    "train.local-steps": 2,
    "train.batch-size": 16,
    "simulation.round-timeout-s": ROUND_TIMEOUT_S,
    "simulation.node-wait-s": 60.0,
}


@pytest.fixture(scope="module")
def deployment(request):
    if shutil.which("flower-superlink") is None or shutil.which("flower-supernode") is None:
        pytest.skip("Flower's deployment binaries are not installed")
    root = Path(tempfile.mkdtemp(prefix="fpd-"))  # short: Unix socket paths are limited to 107 bytes
    dep = Loopback(root, tls=True, auth=True)
    request.addfinalizer(lambda: (dep.stop(), shutil.rmtree(root, ignore_errors=True)))
    dep.start_superlink()
    for i in range(NUM_NODES):
        dep.register(i)
    for i in range(NUM_NODES):
        dep.start_supernode(i, {"partition-id": i, "num-partitions": NUM_NODES, "warm-worker": str(dep.worker_dir)})
    return dep


@pytest.fixture(scope="module")
def run(deployment):
    """Two rounds; SuperNode ``KILLED`` gets SIGKILL as soon as round 1 is written."""
    out = deployment.root / "run"
    run_id = deployment.submit({**RUN_CONFIG, "out-dir": str(out)})
    try:
        wait_for_results(out / "results.json", timeout_s=300, until_rounds=2)  # rows for rounds 0 and 1
        deployment.stop(f"supernode-{KILLED}", sig=signal.SIGKILL)
        results = wait_for_results(out / "results.json", timeout_s=ROUND_TIMEOUT_S + 120)
    except TimeoutError:
        logs = {p.name: p.read_text()[-3000:] for p in (deployment.root / "logs").glob("*.log")}
        pytest.fail(f"the deployment run did not finish; logs:\n{json.dumps(logs, indent=1)}")
    return results, run_id


def test_two_rounds_of_the_default_experiment_complete_over_tls_with_authenticated_nodes(deployment, run):
    results, run_id = run
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["config"]["peft.method"] == "lora" and results["backbone"]["quantization"] == "nf4"
    first = results["rounds"][1]
    assert first["participants"] == [0, 1, 2] and sorted(first["aggregated"]) == [0, 1, 2]
    assert Path(results["adapter_dir"], "adapter_model.safetensors").is_file()
    assert deployment.wait_for_status(run_id, timeout_s=60) == "finished:completed"


def test_only_peft_parameters_travel_between_server_and_nodes(run):
    results, _ = run
    adapter_bytes = results["trainable_params"] * 4
    first, second = results["rounds"][1], results["rounds"][2]
    assert first["downlink_payload_bytes"] == first["uplink_payload_bytes"] == NUM_NODES * adapter_bytes
    assert second["downlink_payload_bytes"] == NUM_NODES * adapter_bytes
    assert second["uplink_payload_bytes"] == (NUM_NODES - 1) * adapter_bytes  # the killed node never replied
    assert adapter_bytes < 0.05 * results["backbone"]["total_bytes"]


def test_a_supernode_killed_mid_round_is_recorded_failed_and_the_round_completes_with_the_others(run):
    results, _ = run
    second = results["rounds"][2]
    assert sorted(second["aggregated"]) == [0, 1]
    assert [f["partition_id"] for f in second["failed"]] == [KILLED]
    assert second["wall_s"] < ROUND_TIMEOUT_S + 30  # bounded by the round timeout, not hung


def test_every_message_was_served_by_a_warm_worker_that_kept_the_model(deployment, run):
    rows = [
        json.loads(line) for f in deployment.worker_dir.glob("*.stats.jsonl") for line in f.read_text().splitlines()
    ]
    kinds = [r["message_type"] for r in rows]
    assert kinds.count("query") == NUM_NODES
    assert kinds.count("train") >= 2 * NUM_NODES - 1  # the killed node may not have answered round 2
    assert len(list(deployment.worker_dir.glob("*.pid"))) == NUM_NODES


def test_a_supernode_whose_key_is_not_registered_is_refused(deployment):
    index = 5  # keys 0..2 are registered; 5 exists on disk but not on the SuperLink
    proc = deployment.start_supernode(index, {"partition-id": 0, "num-partitions": NUM_NODES})
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("an unregistered SuperNode was not refused within 60 s")
    log = (deployment.root / "logs" / f"supernode-{index}.log").read_text()
    assert rc != 0 and "Failed to activate SuperNode" in log
    listed = json.loads(deployment.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)["nodes"]
    assert len(listed) == NUM_NODES


def test_stopping_the_supernodes_ends_their_warm_workers(deployment, run):
    pids = [int(p.read_text()) for p in deployment.worker_dir.glob("*.pid")]
    for i in range(NUM_NODES):
        deployment.stop(f"supernode-{i}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(process_alive(p) for p in pids)
