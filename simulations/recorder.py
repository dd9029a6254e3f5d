"""The ServerApp's results writer: ``Strategy.start``'s ``evaluate_fn`` and the strategies' report callback.

Per round, the strategy (and any DP wrapper) reports what happened through
:meth:`RunRecorder.report`; ``Strategy.start`` then calls :meth:`RunRecorder.evaluate`,
which scores the global adapter on the fixed held-out set (every ``train.eval-every``
rounds and the last), joins the reports and the byte ledger into one row of
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
from fedpeft.task import Task
from simulations.resume import write_checkpoint

log = logging.getLogger("fedpeft")

BYTE_KEYS = ("uplink_payload_bytes", "uplink_message_bytes", "downlink_payload_bytes", "downlink_message_bytes")


class RunRecorder:
    """Collects round reports, evaluates, writes ``run_dir/results.json`` after every round."""

    def __init__(self, cfg: ExperimentConfig, task: Task, ledger: Ledger, run_dir: Path, results: dict[str, Any]):
        self.cfg, self.task, self.ledger, self.run_dir = cfg, task, ledger, run_dir
        self.results = results
        self.pending: dict[int, dict[str, Any]] = {}
        self.strategy = None  # set by the ServerApp: its state is saved with every row
        self._t_round = time.monotonic()

    def report(self, server_round: int, fields: dict[str, Any]) -> None:
        """Merge one report into round ``server_round`` (list fields are extended, others set)."""
        row = self.pending.setdefault(server_round, {})
        for key, value in fields.items():
            if isinstance(value, list) and isinstance(row.get(key), list):
                row[key] = row[key] + value
            else:
                row[key] = value

    def scores(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Held-out scores of ``arrays``, or None when this round is not evaluated."""
        every = self.cfg.train.eval_every
        if server_round not in (0, self.cfg.num_rounds) and server_round % every:
            return None
        return self.task.evaluate(record_to_state(arrays))  # through the frozen-prefix cache when it applies

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``Strategy.start``'s ``evaluate_fn``: score, write the round's row, print progress."""
        scores = self.scores(server_round, arrays)
        fields = self.pending.pop(server_round, {})
        per_round = self.ledger.per_round().get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": None if scores is None else scores["accuracy"],
            "loss": None if scores is None else scores["loss"],
            "participants": list(fields.pop("participants", [])),
            "aggregated": list(fields.pop("aggregated", [])),
            "failed": list(fields.pop("failed", [])),
            "rejected": list(fields.pop("rejected", [])),
            **{key: per_round.get(key, 0) for key in BYTE_KEYS},
            "wall_s": time.monotonic() - self._t_round,
        }
        if scores is not None:
            row["balanced_accuracy"] = scores["balanced_accuracy"]
            row["per_class_accuracy"] = scores["per_class_accuracy"]
            for key in ("perplexity", "exact_match"):  # causal-LM tasks (fedpeft/lm_eval.py)
                if key in scores:
                    row[key] = scores[key]
            if scores.get("generations"):
                append_generations(self.run_dir, server_round, scores["generations"])
        row.update(fields)  # per-client train metrics, strategy extras, epsilon
        self.results["rounds"].append(row)
        if self.strategy is not None and hasattr(self.strategy, "state_for_results"):
            self.results["strategy_state"] = self.strategy.state_for_results()
        if self.strategy is not None and server_round > 0:  # what `fedpeft simulate --resume` continues from
            write_checkpoint(self.run_dir, server_round, record_to_state(arrays), self.strategy, self.ledger.to_json())
        write_results(self.run_dir, self.results)
        self._log_progress(row)
        self._t_round = time.monotonic()
        if scores is None:
            return None
        return MetricRecord({k: scores[k] for k in ("accuracy", "loss") if scores[k] is not None})

    def interrupted(self, t_start: float) -> dict[str, Any]:
        """Write the results of a run stopped by the user: status ``interrupted`` after the last completed round."""
        self.results["status"] = "interrupted"
        self.results["last_completed_round"] = self.results["rounds"][-1]["round"] if self.results["rounds"] else None
        self.results["ledger"] = self.ledger.to_json()
        self.results["wall_s"] = time.monotonic() - t_start
        write_results(self.run_dir, self.results)
        log.warning(
            "interrupted: %s written with the %s completed round(s)",
            self.run_dir / "results.json",
            max(len(self.results["rounds"]) - 1, 0),
        )
        return self.results

    def _log_progress(self, row: dict[str, Any]) -> None:
        score = "not evaluated" if row["loss"] is None else f"loss {row['loss']:.4f}"
        if row["accuracy"] is not None:
            score = f"accuracy {row['accuracy']:.4f} {score}"
        if row.get("perplexity") is not None:
            score += f" perplexity {row['perplexity']:.3f}"
        if row.get("exact_match") is not None:
            score += f" exact-match {row['exact_match']:.4f}"
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
