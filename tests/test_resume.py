"""Resume: a run killed with SIGKILL after round 2 of 4 and resumed ends exactly as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.config import DEFAULTS, ConfigError
from fedpeft.results import load_results
from simulations.inprocess import run_in_process
from simulations.resume import resume_config
from simulations.run import main
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent
SETUPS = {
    "fedavg": {},
    "spsa": {
        "strategy.name": "spsa",
        "spsa.local-steps": 4,
        "spsa.lr": 1e-3,
        "train.local-steps": 0,  # SPSA clients read spsa.*; the tiny config's train.* would be inactive
        "train.batch-size": 32,
    },
    "fedadam": {"strategy.server-optimizer": "adam", "strategy.server-lr": 0.01},  # moments in the checkpoint
    "fedau-client-dp": {
        "strategy.name": "fedau",
        "participation.model": "bernoulli",
        "participation.p-mean": 0.6,
        "dp.mode": "client",
        "strategy.weighting": "uniform",
        "dp.noise-multiplier": 0.5,
        "dp.max-weight": 4.0,
    },
}
# 4 rounds on short snippets in small batches: what is compared is the state a checkpoint carries, not the
# amount of training, and each of the three runs of a setup trains 2-4 rounds
SHORT = {"num-rounds": 4, "data.max-seq-len": 32, "data.num-test-examples": 32, "train.batch-size": 8}
COMPARED = (
    "accuracy",
    "loss",
    "participants",
    "aggregated",
    "uplink_payload_bytes",
    "omega",
    "epsilon",
    "spsa_state_hash",
)


def _write_config(path: Path, **overrides) -> Path:
    """A TOML of the keys that differ from the defaults (a file that sets inactive keys is refused)."""
    flat = tiny_config(**overrides).to_flat()
    lines = [f'"{k}" = {json.dumps(v)}' for k, v in flat.items() if v != DEFAULTS[k]]  # every mode's keys
    path.write_text("\n".join(lines) + "\n")
    return path


def _start_killed_run(config: Path, out: Path, round_: int) -> tuple[subprocess.Popen, threading.Thread, list[str]]:
    """Start the run in a subprocess (in-process engine) and a thread that SIGKILLs it once round ``round_`` is
    recorded; the caller computes the reference run meanwhile (CI has two cores; the two runs share no state)."""
    cmd = [sys.executable, "-m", "simulations.run", "simulate", str(config), "--out", str(out), "--in-process"]
    proc = subprocess.Popen([*cmd, "--no-plot"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors: list[str] = []

    def kill_when_recorded() -> None:
        deadline = time.monotonic() + 900
        path = out / "results.json"
        while time.monotonic() < deadline:
            if path.exists() and any(r["round"] >= round_ for r in json.loads(path.read_text())["rounds"]):
                break
            if proc.poll() is not None:
                errors.append(proc.stderr.read().decode()[-2000:])
                return
            time.sleep(0.2)
        else:
            errors.append(f"round {round_} not recorded within 900 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    killer = threading.Thread(target=kill_when_recorded, daemon=True)
    killer.start()
    return proc, killer, errors


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_a_killed_run_resumed_ends_exactly_as_the_uninterrupted_run(tmp_path, setup):
    overrides = {**SHORT, **SETUPS[setup]}
    config = _write_config(tmp_path / "cfg.toml", **overrides)
    killed = tmp_path / "killed"
    proc, killer, errors = _start_killed_run(config, killed, 2)
    try:
        reference = load_results(run_in_process(tiny_config(**overrides), tmp_path / "ref"))
        killer.join(timeout=930)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not errors and proc.returncode == -signal.SIGKILL, errors
    assert load_results(killed / "results.json")["status"] == "running"  # a SIGKILL leaves no chance to say more

    assert main(["simulate", "--resume", str(killed), "--in-process", "--no-plot"]) == 0

    resumed = load_results(killed / "results.json")
    assert resumed["status"] == "completed" and resumed["resumed_after_rounds"][0] >= 2
    strip = lambda rs: [{k: r.get(k) for k in COMPARED} for r in rs["rounds"]]  # noqa: E731
    assert strip(resumed) == strip(reference)
    a, b = (
        load_file(killed / "adapter/adapter_model.safetensors"),
        load_file(tmp_path / "ref/adapter/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_completed_runs_missing_checkpoints_and_sample_level_dp(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(ConfigError, match="no results.json"):
        resume_config(run)
    flat = tiny_config().to_flat()
    (run / "results.json").write_text(json.dumps({"status": "completed", "config": flat, "rounds": []}))
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_config(run)
    (run / "results.json").write_text(json.dumps({"status": "running", "config": flat, "rounds": []}))
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_config(run)
    (run / "checkpoint.json").write_text("{}")
    (run / "checkpoint.npz").write_bytes(b"")
    dp = tiny_config(**{"dp.mode": "sample"}).to_flat()
    (run / "results.json").write_text(json.dumps({"status": "interrupted", "config": dp, "rounds": []}))
    with pytest.raises(ConfigError, match="under-report epsilon"):
        resume_config(run)
    assert main(["simulate", "--resume", str(run), "--out", str(tmp_path / "x")]) == 2
