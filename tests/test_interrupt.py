"""Ctrl-C: the first interrupt stops a run within seconds, records it as interrupted, leaves no process."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.app import Message

from fedpeft.results import load_results
from simulations.inprocess import run_in_process
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow


def _interrupt_in_round_two(msg: Message, context, call_next):
    if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 2:
        raise KeyboardInterrupt  # what Ctrl-C raises in the in-process runner's main thread
    return call_next(msg, context)


def test_an_interrupted_in_process_run_is_recorded_as_interrupted_after_its_last_round(tmp_path):
    results = load_results(
        run_in_process(tiny_config(**{"num-rounds": 4}), tmp_path / "r", client_mods=[_interrupt_in_round_two])
    )
    assert results["status"] == "interrupted" and results["last_completed_round"] == 1
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert results["adapter_dir"] is None  # nothing exported as if it had finished


def test_ctrl_c_stops_a_real_flower_simulation_within_seconds_and_leaves_no_child_process(tmp_path):
    config = tmp_path / "long.toml"
    flat = tiny_config(**{"num-rounds": 40, "name": "long"}).to_flat()
    config.write_text("\n".join(f'"{k}" = {json.dumps(v)}' for k, v in flat.items()) + "\n")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run", "simulate", str(config), "--out", str(out), "--no-plot"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # wait for round 1's row
            path = out / "results.json"
            if path.exists() and len(json.loads(path.read_text() or "{}").get("rounds", [])) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        stopped_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, proc.stderr.read()
    results = load_results(out / "results.json")
    assert results["status"] == "interrupted" and results["last_completed_round"] >= 1
    assert stopped_s < 60
    time.sleep(5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [c.cmdline()[:3] for c in alive]
