"""One results file per run: resolved config, versions, per-round metrics, byte ledger.

``runs/<name>/seed-<seed>/results.json``. It is rewritten after every round, so an
interrupted run still leaves what it measured (``status`` says how it ended).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
TRACKED_PACKAGES = ("fedpeft", "flwr", "torch", "transformers", "peft", "bitsandbytes", "opacus", "numpy")


def default_run_dir(name: str, seed: int, root: str | Path = "runs") -> Path:
    """``runs/<name>/seed-<seed>``."""
    return Path(root) / name / f"seed-{seed}"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision(path: str | Path = ".") -> str:
    """``git rev-parse HEAD`` (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically: a temporary file in the same folder, flushed, then renamed.

    A reader (or a crash) sees the previous complete file or the new one, never a partial one;
    a failure to serialise leaves the previous file untouched and no temporary file behind.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_FILE}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp's 0600 would make results private to this user
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, run_dir / RESULTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return run_dir / RESULTS_FILE


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results file, given the file or its run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass a run folder or its results.json")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a fedpeft results file (not JSON: {err}); pass a run's results.json") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    rounds = results.get("rounds") if isinstance(results, dict) else None
    if not isinstance(rounds, list) or not isinstance(results.get("config"), dict):
        raise ValueError(f"{path} is not a fedpeft results file (no 'rounds' / 'config'); pass a run's results.json")
    if not all(isinstance(r, dict) and "round" in r for r in rounds):
        raise ValueError(f"{path} is a damaged fedpeft results file (a round row has no 'round'); rerun that run")
    return results


def require_metric(results: dict[str, Any], path: str | Path, metric: str = "accuracy") -> None:
    """Raise ``ValueError`` naming the fix unless some round of ``results`` has a number under ``metric``.

    A results file of another layout, or one whose metric is named differently, would
    otherwise draw an empty figure or report and exit 0.
    """
    if any(isinstance(r.get(metric), int | float) for r in results.get("rounds", [])):
        return
    rows = results.get("rounds", [])
    if not rows:
        raise ValueError(f"{path} has no rounds yet (status {results.get('status')!r}); nothing to plot or report")
    found = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float) and k != "round"})
    raise ValueError(
        f"{path} has no {metric!r} in any round (its rows have: {', '.join(found[:12]) or 'no numbers'}); "
        "fedpeft plot and report read results.json as fedpeft simulate writes it: rerun the run, or rename "
        f"the column to {metric!r}"
    )


def round_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-round rows (round 0 is the initial evaluation), each with cumulative byte counts."""
    rows, up, down = [], 0, 0
    for r in results["rounds"]:
        up += r.get("uplink_payload_bytes", 0)
        down += r.get("downlink_payload_bytes", 0)
        rows.append({**r, "cum_uplink_payload_bytes": up, "cum_total_payload_bytes": up + down})
    return rows


def bytes_to_target(results: dict[str, Any], target: float, metric: str = "accuracy") -> dict[str, Any] | None:
    """The first round whose ``metric`` reaches ``target``, with the bytes spent until then.

    Returns ``None`` when no round reaches it. Byte counts are cumulative payload bytes over
    all clients, up to and including that round; round 0 (before training) counts as
    reached with zero bytes.
    """
    for row in round_metrics(results):
        value = row.get(metric)
        if value is not None and value >= target:
            return {
                "round": row["round"],
                metric: value,
                "uplink_payload_bytes": row["cum_uplink_payload_bytes"],
                "total_payload_bytes": row["cum_total_payload_bytes"],
            }
    return None


def experiment_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config minus what does not define the experiment: what runs of one group share.

    Dropped: ``seed`` (what a group averages over), ``out-dir`` (where the results go) and
    the ``simulation.*`` keys (Ray resources and the server's patience: how a run is
    scheduled, not what it computes).
    """
    return {k: v for k, v in config.items() if k not in ("seed", "out-dir") and not k.startswith("simulation.")}


def group_by_experiment(results: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of ``results`` grouped by :func:`experiment_config`, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, res in enumerate(results):
        key = json.dumps(experiment_config(res["config"]), sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def group_labels(configs: list[dict[str, Any]]) -> list[str]:
    """One legend/table label per group config: its ``name``, plus, where several groups share that
    name, the keys whose values differ among them (``quickstart: train.lr=0.01``)."""
    labels = []
    for c in configs:
        peers = [d for d in configs if d.get("name") == c.get("name")]
        keys = sorted({k for d in peers for k in d} - {"name"})
        # a key some peers lack belongs to a mode they do not run (dp.clip-norm without DP): compare where present
        differ = [k for k in keys if len({json.dumps(d[k], default=str) for d in peers if k in d}) > 1]
        extra = ", ".join(f"{k}={c[k]}" for k in differ if k in c)
        labels.append(f"{c.get('name', '?')}: {extra}" if extra else str(c.get("name", "?")))
    return labels
