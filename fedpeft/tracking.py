"""Experiment trackers as views of results.json: TensorBoard event files or an MLflow run.

The run recorder (simulations/recorder.py) hands every row it writes to results.json to one
sink (:meth:`Sink.log_round`) and closes it when the run ends (:meth:`Sink.close`). A sink
logs the same numbers: every numeric field of the row (accuracy, loss, balanced accuracy,
per-class accuracy, epsilon, train metrics), the counts of participants / aggregated /
failed / rejected clients, the round's bytes and their cumulative sums (so a tracker can
plot accuracy against bytes), under the round number as the step. The resolved config goes
in as parameters; results.json, the exported adapter and the figures as artifacts.

- ``tensorboard``: ``<run folder>/tensorboard/`` (one folder per run, so ``tensorboard
  --logdir`` on a sweep's folder shows its runs side by side); TensorBoard has no
  metric-vs-metric axis, so ``accuracy_by_total_bytes`` logs accuracy with the cumulative
  up + down payload bytes as its step.
- ``mlflow``: one run in experiment ``tracking.experiment`` (default: the config's name; a
  sweep names one experiment for all its runs) of the store at ``tracking.uri``. The default
  store is ``sqlite:///runs/mlflow.db`` (MLflow's file store is legacy), with artifacts in
  ``runs/mlflow-artifacts``; mlflow-skinny plus SQLAlchemy and Alembic cover it. A resumed
  run logs into the same MLflow run.

results.json stays the source of truth: a tracker that fails mid-run is warned about once
and dropped, the run goes on. :func:`check_tracking` runs in ``fedpeft check`` (before Ray):
a missing package or an unreachable server is an error naming the fix, not a fallback.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, ExperimentConfig

log = logging.getLogger("fedpeft")

DEFAULT_MLFLOW_URI = "sqlite:///runs/mlflow.db"
MLFLOW_SCHEMES = ("sqlite:///", "http://", "https://")
COUNTED = ("participants", "aggregated", "failed", "rejected")
BYTE_KEYS = ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes")
INSTALL = "pip install 'fedpeft[tracking]'"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def row_metrics(row: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, float]:
    """The tracker metrics of ``row`` (a results.json round), given every row so far (``rounds``, ending in it).

    Numeric fields as they are (a dict of numbers becomes ``<field>/<key>``), list fields of
    clients as counts ``num_<field>``, and ``cumulative_<bytes key>`` plus
    ``cumulative_total_payload_bytes`` (uplink + downlink) summed over ``rounds``.
    """
    metrics: dict[str, float] = {}
    for key, value in row.items():
        if key == "round":
            continue
        if key in COUNTED and isinstance(value, list):
            metrics[f"num_{key}"] = float(len(value))
        elif isinstance(value, dict):
            metrics.update({f"{key}/{k}": v for k, x in value.items() if (v := _number(x)) is not None})
        elif (number := _number(value)) is not None:
            metrics[key] = number
    for key in BYTE_KEYS:
        metrics[f"cumulative_{key}"] = float(sum(r.get(key, 0) for r in rounds))
    metrics["cumulative_total_payload_bytes"] = (
        metrics["cumulative_uplink_payload_bytes"] + metrics["cumulative_downlink_payload_bytes"]
    )
    return metrics


def resolve_uri(cfg: ExperimentConfig) -> str:
    """``tracking.uri``, or the local SQLite store when it is empty."""
    return cfg.tracking.uri or DEFAULT_MLFLOW_URI


def check_tracking(cfg: ExperimentConfig, timeout_s: float = 5.0) -> str | None:
    """Raise :class:`ConfigError` when the tracker cannot be used; return a summary line (None when off)."""
    backend = cfg.tracking.backend
    if backend == "none":
        return None
    if backend == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(f"tracking.backend='tensorboard' needs the tensorboard package: {INSTALL}") from None
        return "tracking: TensorBoard event files in <run folder>/tensorboard"
    try:
        import mlflow  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"tracking.backend='mlflow' needs {err.name}: {INSTALL}") from None
    uri = resolve_uri(cfg)
    if not uri.startswith(MLFLOW_SCHEMES):
        raise ConfigError(
            f"tracking.uri={uri!r} is not an MLflow store fedpeft supports; use sqlite:///PATH/mlflow.db, "
            "http(s)://HOST:PORT of an MLflow server, or '' for sqlite:///runs/mlflow.db"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not existing.is_dir():
            raise ConfigError(f"tracking.uri={uri!r}: {existing} is not a folder; point the store elsewhere")
    else:
        _check_server(uri, timeout_s)
    return f"tracking: MLflow experiment {cfg.tracking.experiment or cfg.name!r} at {uri}"


def _check_server(uri: str, timeout_s: float) -> None:
    """An MLflow server answers ``GET /health`` with 200 OK."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as answer:
            if answer.status == 200:
                return
            why = f"HTTP {answer.status}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        why = str(getattr(err, "reason", err))
    raise ConfigError(
        f"tracking.uri={uri!r} is unreachable ({why}); start the server (mlflow server --port ...), "
        "fix the address, or set tracking.uri='' for the local store sqlite:///runs/mlflow.db"
    )


class Sink:
    """No tracker: the base every sink extends (each hook does nothing)."""

    info: dict[str, Any] = {}

    def log_round(self, row: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
        """Log one results.json row; ``rounds`` is every row so far, ending in ``row``."""

    def close(self, results: dict[str, Any], run_dir: Path) -> None:
        """The run ended (``results["status"]``): log artifacts and the final status."""


class TensorBoardSink(Sink):
    """Scalars, the config as text and figures as images, in ``logdir``."""

    def __init__(self, *, logdir: Path, flat: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.info = {"backend": "tensorboard", "logdir": str(logdir)}
        self.writer.add_text("config", "\n".join(f"    {k} = {json.dumps(v)}" for k, v in flat.items()), 0)

    def log_round(self, row: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
        """One scalar per metric at step = round; accuracy also at step = cumulative payload bytes."""
        metrics = row_metrics(row, rounds)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, row["round"])
        if "accuracy" in metrics:
            self.writer.add_scalar(
                "accuracy_by_total_bytes", metrics["accuracy"], int(metrics["cumulative_total_payload_bytes"])
            )
        self.writer.flush()

    def close(self, results: dict[str, Any], run_dir: Path) -> None:
        """The status as text; the writer is flushed and closed."""
        self.writer.add_text("status", str(results.get("status")), len(results.get("rounds", [])))
        self.writer.close()


class MlflowSink(Sink):
    """One MLflow run: params at the start, metrics per round, artifacts and status at the end."""

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str,
        run_dir: str,
        flat: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:  # a resumed run goes on in the same MLflow run
            self.client.update_run(run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:  # artifacts beside a SQLite store, not in an ./mlruns of wherever the run was started
                where = None
                if uri.startswith("sqlite:///"):
                    where = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlflow-artifacts").as_uri()
                experiment_id = self.client.create_experiment(experiment, artifact_location=where)
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"run_dir": run_dir}).info.run_id
            params = [Param(k, json.dumps(v) if isinstance(v, str) else str(v)) for k, v in flat.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[start : start + 100])
        self.run_id = run_id
        self.info = {"backend": "mlflow", "uri": uri, "experiment": experiment, "run_id": run_id}

    def log_round(self, row: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
        """Every metric of the row at step = round."""
        from mlflow.entities import Metric

        metrics = row_metrics(row, rounds)
        now = _now_ms()
        batch = [Metric(k, v, now, row["round"]) for k, v in metrics.items() if math.isfinite(v)]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def close(self, results: dict[str, Any], run_dir: Path) -> None:
        """results.json and the adapter as artifacts; FINISHED, KILLED (interrupted) or FAILED."""
        self.client.log_artifact(self.run_id, str(run_dir / "results.json"))
        if results.get("adapter_dir"):
            self.client.log_artifacts(self.run_id, results["adapter_dir"], artifact_path="adapter")
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(results.get("status"), "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def build_sink(cfg: ExperimentConfig, run_dir: Path) -> Sink:
    """The sink ``tracking.backend`` names for the run in ``run_dir`` (a resumed MLflow run keeps its run id)."""
    backend = cfg.tracking.backend
    if backend == "none":
        return Sink()
    flat = cfg.to_flat()
    if backend == "tensorboard":
        return TensorBoardSink(logdir=run_dir / "tensorboard", flat=flat)
    previous = _previous_info(run_dir)
    uri = resolve_uri(cfg)
    same = previous.get("backend") == "mlflow" and previous.get("uri") == uri
    return MlflowSink(
        uri=uri,
        experiment=cfg.tracking.experiment or cfg.name,
        run_name=run_name(cfg, run_dir),
        run_dir=str(run_dir.resolve()),
        flat=flat,
        run_id=previous.get("run_id") if same else None,
    )


def run_name(cfg: ExperimentConfig, run_dir: Path) -> str:
    """``<name>/<grid label>/seed-<s>`` under a sweep or ``runs/``, else ``<name>/seed-<s>``."""
    parts = run_dir.parts
    if cfg.name in parts[:-1]:  # runs/<name>/seed-<s>, <sweep>/<name>/<label>/seed-<s>
        start = len(parts) - 1 - parts[::-1].index(cfg.name)
        return "/".join(parts[start:])
    return f"{cfg.name}/seed-{cfg.seed}"


def log_figure(results: dict[str, Any], figure: Path) -> None:
    """Add ``figure`` (written after the run) to the tracker named in ``results["tracking"]``."""
    info = results.get("tracking") or {}
    if info.get("backend") == "tensorboard":
        from matplotlib.image import imread
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=info["logdir"]) as writer:  # TensorBoard keeps images, not files
            writer.add_image(figure.stem, imread(figure)[..., :3], 0, dataformats="HWC")
    elif info.get("backend") == "mlflow":
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=info["uri"]).log_artifact(info["run_id"], str(figure), artifact_path="figures")


def _previous_info(run_dir: Path) -> dict[str, Any]:
    """The ``tracking`` entry of an earlier attempt's results.json in ``run_dir`` (a resume), else ``{}``."""
    try:
        return json.loads((run_dir / "results.json").read_text()).get("tracking") or {}
    except (OSError, ValueError, AttributeError):
        return {}
