"""Results files: bytes spent until an accuracy target, and the plot's target line."""

import json

from fedpeft.plot import plot_runs, target_table
from fedpeft.results import bytes_to_target


def _results(name, rows):
    cfg = {"name": name, "strategy.name": "spsa", "peft.method": "lora", "model.quantization": "nf4", "seed": 0}
    return {"config": cfg, "rounds": rows}


ROWS = [
    {"round": 0, "accuracy": 0.60},
    {"round": 1, "accuracy": 0.65, "uplink_payload_bytes": 50, "downlink_payload_bytes": 32},
    {"round": 2, "accuracy": None, "uplink_payload_bytes": 0, "downlink_payload_bytes": 0},  # empty round
    {"round": 3, "accuracy": 0.71, "uplink_payload_bytes": 50, "downlink_payload_bytes": 90},
    {"round": 4, "accuracy": 0.69, "uplink_payload_bytes": 25, "downlink_payload_bytes": 40},
]


def test_bytes_to_target_counts_every_byte_up_to_the_first_round_that_reaches_it():
    hit = bytes_to_target(_results("a", ROWS), 0.70)
    assert hit == {"round": 3, "accuracy": 0.71, "uplink_payload_bytes": 100, "total_payload_bytes": 222}
    assert bytes_to_target(_results("a", ROWS), 0.60)["total_payload_bytes"] == 0  # round 0 already there
    assert bytes_to_target(_results("a", ROWS), 0.72) is None


def test_plot_with_a_target_writes_a_png_and_a_table(tmp_path):
    paths = []
    for name, rows in (("fast", ROWS), ("slow", ROWS[:2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(name, rows)))
        paths.append(tmp_path / name)
    out = plot_runs(paths, tmp_path / "p.png", total_bytes=True, target=0.7)
    assert out.stat().st_size > 10_000
    table = target_table(paths, 0.7).splitlines()
    assert table[2] == "fast: spsa / lora / nf4 | 3 | 100 | 222"
    assert table[3] == "slow: spsa / lora / nf4 | not reached (best 0.65) | - | -"
