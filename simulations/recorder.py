"""The ServerApp's results writer: ``Strategy.start``'s ``evaluate_fn`` and the strategies' report callback.

Per round, the strategy (and any DP wrapper) reports what happened through
:meth:`RunRecorder.report`; ``Strategy.start`` then calls :meth:`RunRecorder.evaluate`,
which scores the global adapter on the fixed held-out set (every ``train.eval-every``
rounds and the last; with ``data.num-val-examples`` > 0 those rounds score validation
and only the last also scores test, so nothing is chosen on test), joins the reports and the byte ledger into one row of
``results.json``, rewrites the file, and prints the progress line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord

from fedpeft.comm import Ledger
from fedpeft.config import ExperimentConfig
from fedpeft.records import record_to_state
from fedpeft.results import write_results
from fedpeft.rundir import RunDir
from fedpeft.task import Task
from fedpeft.tracking import Sink, build_sink
from simulations.resume import write_checkpoint

log = logging.getLogger("fedpeft")

BYTE_KEYS = ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes")


class RunRecorder:
    """Collects round reports, evaluates, writes ``run_dir/results.json`` after every round."""

    def __init__(self, cfg: ExperimentConfig, task: Task, ledger: Ledger, run_dir: Path, results: dict[str, Any]):
        self.cfg, self.task, self.ledger, self.run_dir = cfg, task, ledger, run_dir
        self.results = results
        self.results.setdefault("splits", split_columns(cfg))
        self.pending: dict[int, dict[str, Any]] = {}
        self.strategy = None  # set by the ServerApp: its state is saved with every row
        self._t_round = time.monotonic()
        self.sink = build_sink(cfg, run_dir)  # tracking.backend: TensorBoard / MLflow view of the same rows
        if cfg.tracking.backend != "none":
            results["tracking"] = self.sink.info

    def _track(self, hook: str, *args: Any) -> None:
        """Call the sink; a tracker that fails is warned about once and dropped (results.json is the record)."""
        try:
            getattr(self.sink, hook)(*args)
        except Exception as err:  # noqa: BLE001 - any tracker failure; the run goes on without it
            log.warning("tracking.backend=%r failed (%s: %s); results.json goes on without it",
                        self.cfg.tracking.backend, type(err).__name__, err)  # fmt: skip
            self.sink = Sink()

    def close(self) -> None:
        """The run ended (completed or failed, as written in results.json): close the tracker."""
        self._track("close", self.results, self.run_dir)

    def report(self, server_round: int, fields: dict[str, Any]) -> None:
        """Merge one report into round ``server_round`` (list fields are extended, others set)."""
        row = self.pending.setdefault(server_round, {})
        for key, value in fields.items():
            if isinstance(value, list) and isinstance(row.get(key), list):
                row[key] = row[key] + value
            else:
                row[key] = value

    def scores(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Held-out scores of ``arrays``, or None when this round is not evaluated.

        Test scores sit under their own keys; validation scores (with ``data.num-val-examples``
        > 0) under ``val_<key>``, and then test is scored in the last round only.
        """
        every = self.cfg.train.eval_every
        if server_round not in (0, self.cfg.num_rounds) and server_round % every:
            return None
        state = record_to_state(arrays)
        val_loader = self.task.validation_loader()
        out: dict[str, Any] = {}
        if val_loader is not None:
            val = self.task.evaluate(state, val_loader)
            out.update({f"val_{key}": val[key] for key in VAL_KEYS})
        if val_loader is None or server_round == self.cfg.num_rounds:
            out.update(self.task.evaluate(state))  # through the frozen-prefix cache when it applies
        return out

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``Strategy.start``'s ``evaluate_fn``: score, write the round's row, print progress."""
        scores = self.scores(server_round, arrays)
        fields = self.pending.pop(server_round, {})
        per_round = self.ledger.per_round().get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": None if scores is None else scores.get("accuracy"),
            "loss": None if scores is None else scores.get("loss"),
            "participants": list(fields.pop("participants", [])),
            "aggregated": list(fields.pop("aggregated", [])),
            "failed": list(fields.pop("failed", [])),
            "rejected": list(fields.pop("rejected", [])),
            **{key: per_round.get(key, 0) for key in BYTE_KEYS},
            "wall_s": time.monotonic() - self._t_round,
        }
        if scores is not None and "accuracy" in scores:
            row["balanced_accuracy"] = scores["balanced_accuracy"]
            row["per_class_accuracy"] = scores["per_class_accuracy"]
        if scores is not None:
            row.update({f"val_{key}": scores[f"val_{key}"] for key in VAL_KEYS if f"val_{key}" in scores})
            for key in ("perplexity", "exact_match"):  # causal-LM tasks (fedpeft/lm_eval.py)
                if key in scores:
                    row[key] = scores[key]
            if scores.get("generations"):
                append_generations(self.run_dir, server_round, scores["generations"])
        row.update(fields)  # per-client train metrics, strategy extras, epsilon
        self.results["rounds"].append(row)
        state = self.strategy.state_for_results() if self.strategy is not None else {}
        if state:
            self.results["strategy_state"] = state
        if self.strategy is not None and server_round > 0:  # what `fedpeft simulate --resume` continues from
            write_checkpoint(self.run_dir, server_round, record_to_state(arrays), self.strategy, self.ledger.to_json())
        write_results(self.run_dir, self.results)
        self._track("log_round", row, self.results["rounds"])
        self._log_progress(row)
        self._t_round = time.monotonic()
        if scores is None:
            return None
        keys = ("accuracy", "loss", "val_accuracy", "val_loss")
        return MetricRecord({k: scores[k] for k in keys if scores.get(k) is not None})

    def interrupted(self, t_start: float) -> dict[str, Any]:
        """Write the results of a run stopped by the user: status ``interrupted`` after the last completed round."""
        self.results["status"] = "interrupted"
        self.results["last_completed_round"] = self.results["rounds"][-1]["round"] if self.results["rounds"] else None
        self.results["ledger"] = self.ledger.to_json()
        self.results["wall_s"] = time.monotonic() - t_start
        write_results(self.run_dir, self.results)
        self.close()
        log.warning(
            "interrupted: %s written with the %s completed round(s)",
            RunDir(self.run_dir).results,
            max(len(self.results["rounds"]) - 1, 0),
        )
        return self.results

    def _log_progress(self, row: dict[str, Any]) -> None:
        score = _score_text(row)
        if row["round"] == 0:
            log.info("round 0: %s", score)
            return
        rounds = self.results["rounds"]
        log.info(
            "round %d/%d: %s | %d online, %d aggregated, %d failed, %d rejected | "
            "cumulative bytes up %s down %s | %.1f s",
            row["round"], self.cfg.num_rounds, score, len(row["participants"]), len(row["aggregated"]),
            len(row["failed"]), len(row["rejected"]),
            format_bytes(sum(r["uplink_payload_bytes"] for r in rounds)),
            format_bytes(sum(r["downlink_payload_bytes"] for r in rounds)), row["wall_s"],
        )  # fmt: skip


VAL_KEYS = ("accuracy", "loss", "balanced_accuracy")


def split_columns(cfg: ExperimentConfig) -> dict[str, str]:
    """Which split each score column of a round row comes from (written to results.json)."""
    test = f"test ({cfg.data.num_test_examples} held-out rows)"
    columns = {key: test for key in ("accuracy", "loss", "balanced_accuracy", "per_class_accuracy")}
    if cfg.data.num_val_examples:
        val = f"validation ({cfg.data.num_val_examples} rows carved from the training pool; every evaluated round)"
        columns = {key: f"{where}; last round only" for key, where in columns.items()}
        columns.update({f"val_{key}": val for key in VAL_KEYS})
    return columns


def _score_text(row: dict[str, Any]) -> str:
    parts = [
        f"{name} {row[key]:.4f}"
        for key, name in (("val_accuracy", "val accuracy"), ("accuracy", "accuracy"), ("loss", "loss"))
        if row.get(key) is not None
    ]
    if row.get("perplexity") is not None:  # causal-LM tasks
        parts.append(f"perplexity {row['perplexity']:.3f}")
    if row.get("exact_match") is not None:
        parts.append(f"exact-match {row['exact_match']:.4f}")
    return " ".join(parts) or "not evaluated"


GENERATIONS_FILE = "generations.jsonl"


def append_generations(run_dir: Path, server_round: int, samples: list[dict[str, Any]]) -> Path:
    """Append one JSON line per sample reply (round, prompt, reply, target) to ``run_dir/generations.jsonl``."""
    import json

    path = Path(run_dir) / GENERATIONS_FILE
    with path.open("a", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps({"round": server_round, **sample}, ensure_ascii=False) + "\n")
    return path


def format_bytes(n: int) -> str:
    """Bytes for the progress line, in a unit that shows them (SPSA rounds move bytes, not MB)."""
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
