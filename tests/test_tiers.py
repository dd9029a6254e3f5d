"""The per-tier table: bytes per client-round and training memory by LoRA rank, from results files."""

import json

from simulations.experiments.tiers import markdown, tier_rows


def _results(path, name, ranks, ledger, memory=None):
    path.mkdir(parents=True)
    results = {
        "status": "completed",
        "config": {
            "name": name,
            "peft.lora-rank": 8,
            "partition.num-partitions": len(ranks),
            "train.optimizer": "adamw",
        },
        "client_ranks": ranks,
        "training_bytes_by_rank": memory or {},
        "backbone": {"total_bytes": 1_000_000},
        "trainable_params": 1000,
        "ledger": ledger,
        "rounds": [],
    }
    (path / "results.json").write_text(json.dumps(results))


def _row(pid, direction, payload, kind="train"):
    return {
        "round": 1,
        "partition_id": pid,
        "direction": direction,
        "payload_bytes": payload,
        "message_bytes": payload + 9,
        "kind": kind,
    }


def test_tiers_group_client_rounds_by_rank_and_take_the_median_bytes(tmp_path):
    ledger = [
        _row(0, "up", 100),
        _row(0, "down", 120),
        _row(1, "up", 400),
        _row(1, "down", 480),
        _row(0, "up", 7, "setup"),
    ]
    _results(tmp_path / "a" / "seed-0", "fleet", [2, 8], ledger, {"2": 2_000_000, "8": 3_000_000})
    _results(tmp_path / "a" / "seed-1", "fleet", [2, 8], [_row(0, "up", 300), _row(0, "down", 120)], {"2": 2_000_000})
    rows = tier_rows(tmp_path)
    assert [(r["rank"], r["client_rounds"], r["uplink_bytes"], r["downlink_bytes"]) for r in rows] == [
        (2, 2, 200, 120),  # median of 100 and 300; the set-up message is not a client-round
        (8, 1, 400, 480),
    ]
    assert [r["training_mb"] for r in rows] == [2.0, 3.0]
    assert "| fleet | 2 | 2 | 200 | 120 | 2.00 |" in markdown(rows)


def test_a_one_rank_run_gets_its_training_memory_from_its_own_figures(tmp_path):
    _results(tmp_path / "b", "solo", [8, 8], [_row(0, "up", 4000), _row(1, "down", 4000)])
    (row,) = tier_rows(tmp_path)
    assert row["training_mb"] == (1_000_000 + 1000 * 4 * 4) / 1e6  # parameters, gradients, two AdamW moments
