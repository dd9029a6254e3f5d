"""SIGTERM (kill, a batch scheduler, a container stop) stops a run or a sweep as Ctrl-C does: interrupted, resumable."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedpeft.results import load_results
from simulations.interrupt import STOP, sigterm_as_ctrl_c, stop_on_signals
from simulations.run import main
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_sets_the_stop_flag_under_the_engine_handler_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        assert not STOP.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread
        assert STOP.is_set()
    assert not STOP.is_set() and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_raises_keyboard_interrupt_in_the_main_thread_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's handler once a test in this process started Ray
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted long before this ends
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_the_checkpoint_renames_waits_until_both_are_done():
    from simulations.resume import _signals_held

    order = []
    # another thread that does not block signals (Ray and gRPC start such threads): a main-thread
    # signal mask alone would let the kernel hand SIGTERM to it, and the handler would run in the block
    other = threading.Thread(target=time.sleep, args=(1.0,), daemon=True)
    other.start()
    with pytest.raises(KeyboardInterrupt), sigterm_as_ctrl_c():
        with _signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # held: no KeyboardInterrupt between the two renames
            order.append("both renamed")
        order.append("not reached")  # delivered as soon as the block ends
    assert order == ["both renamed"]


def _ignore_sigint() -> None:  # what a shell does to a job started with `&`
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_sigterm_stops_a_background_sweep_marks_its_run_interrupted_and_the_same_command_resumes_it(tmp_path):
    config = tmp_path / "long.toml"
    small = {"data.num-train-examples": 48, "data.num-test-examples": 32, "data.max-seq-len": 32}
    flat = tiny_config(**{"num-rounds": 8, "name": "long", "train.local-steps": 1, **small}).to_flat()
    config.write_text("\n".join(f'"{k}" = {json.dumps(v)}' for k, v in flat.items()) + "\n")
    out = tmp_path / "sweep"
    argv = ["sweep", str(config), "--out", str(out), "--jobs", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    results = out / "long" / "seed-0" / "results.json"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for round 1's row: its checkpoint is written
            if results.exists() and len(json.loads(results.read_text() or "{}").get("rounds", [])) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # ignored, as in a background job
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 130, stderr
    stopped = load_results(results)
    assert stopped["status"] == "interrupted" and 1 <= stopped["last_completed_round"] < 8, stderr
    manifest = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in manifest] == ["interrupted"]

    assert main(argv) == 0  # the same command continues the run from its checkpoint
    done = load_results(results)
    assert done["status"] == "completed" and len(done["rounds"]) == 9
    assert done["resumed_after_rounds"] and done["resumed_after_rounds"][0] >= stopped["last_completed_round"] - 1
    assert [r["round"] for r in done["rounds"]] == list(range(9))
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["resumed"] is True
