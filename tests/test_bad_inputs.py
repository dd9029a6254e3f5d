"""Bad inputs get exit code 2 and a message naming the key or file and the fix, before Ray starts.

Each case writes its files under ``tmp_path``, calls ``simulations.run.main`` in-process and
reads stderr. A small local CSV (60 rows) keeps the data cheap; the model cases use the
embedded MiniLM's config.json on the meta device (no weights are read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from simulations.run import main

ROOT = Path(__file__).resolve().parents[1]


def _csv(path: Path, rows: list[tuple[str, str]] | None = None, header: str = "text,label", encoding="utf-8") -> Path:
    rows = rows if rows is not None else [(f"snippet number {i} is {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(60)]  # fmt: skip
    path.write_bytes(("\n".join([header, *(f"{t},{lab}" for t, lab in rows)]) + "\n").encode(encoding))
    return path


def _config(tmp: Path, extra: str = "", data: Path | None = None, name: str = "bad.toml") -> Path:
    data = data or _csv(tmp / "reviews.csv")
    body = f"""
        name = "bad"
        num-rounds = 2
        [data]
        dataset = "{data}"
        num-train-examples = 40
        num-test-examples = 10
        max-seq-len = 16
        [partition]
        num-partitions = 3
        scheme = "iid"
        [participation]
        model = "always"
        [train]
        local-steps = 1
        batch-size = 4
    """
    path = tmp / name
    path.write_text(textwrap.dedent(body) + textwrap.dedent(extra))
    return path


def _with(cfg_text: str, section: str, line: str) -> str:
    """Add ``line`` under ``[section]`` (TOML tables cannot repeat)."""
    return cfg_text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)


def _edit(tmp: Path, section: str, line: str) -> Path:
    path = _config(tmp)
    path.write_text(_with(path.read_text(), section, line))
    return path


def _model_folder(tmp: Path, files: dict[str, str]) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _trace(tmp: Path, matrix) -> Path:
    path = tmp / "trace.npz"
    np.savez(path, participation=np.asarray(matrix))
    return path


# Each case: (id, setup(tmp) -> argv, fragments the error must contain: the key/file, then the fix)
CASES = [
    # --- config files and overrides
    ("empty-config", lambda t: ["check", str(_blank(t / "e.toml", ""))], ["e.toml", "is empty", "name ="]),
    ("toml-syntax", lambda t: ["check", str(_blank(t / "s.toml", "name = \n"))], ["s.toml", "not readable UTF-8 TOML", "at line 1", "fix that line"]),
    ("toml-not-utf8", lambda t: ["check", str(_blank(t / "u.toml", b'name = "\xe9"\n'))], ["u.toml", "not readable UTF-8 TOML", "0xe9"]),
    ("config-missing", lambda t: ["check", str(t / "nope.toml")], ["nope.toml", "simulations/configs"]),
    ("config-is-a-folder", lambda t: ["check", str(t)], ["is a folder", "pass one of its .toml files"]),
    ("unknown-command", lambda t: ["chek", str(_config(t))], ["invalid choice: 'chek'", "choose from"]),
    ("key-typo", lambda t: ["check", str(_edit(t, "train", "lrr = 0.1"))], ["train.lrr", "did you mean train.lr"]),
    ("lr-inf", lambda t: ["check", str(_config(t)), "--set", "train.lr=inf"], ["train.lr", "finite"]),
    ("lr-nan", lambda t: ["check", str(_config(t)), "--set", "train.lr=nan"], ["train.lr", "finite"]),
    ("lr-negative", lambda t: ["check", str(_config(t)), "--set", "train.lr=-0.1"], ["train.lr", "> 0"]),
    ("clip-zero", lambda t: ["check", str(_config(t)), "--set", "dp.mode=sample", "--set", "dp.clip-norm=0"],
     ["dp.clip-norm", "> 0"]),
    ("timeout-inf", lambda t: ["check", str(_config(t)), "--set", "simulation.round-timeout-s=inf"],
     ["simulation.round-timeout-s", "finite"]),
    ("wrong-type", lambda t: ["check", str(_config(t)), "--set", 'num-rounds="five"'], ["num-rounds", "wants int"]),
    ("bad-choice", lambda t: ["check", str(_config(t)), "--set", "strategy.name=fedavgg"],
     ["strategy.name", "valid choices"]),
    ("override-no-equals", lambda t: ["check", str(_config(t)), "--set", "train.lr"], ["train.lr", "key=value"]),
    ("override-twice", lambda t: ["check", str(_config(t)), "--set", "train.lr=0.1", "--set", "train.lr=0.2"],
     ["train.lr", "given twice"]),
    ("dp-settings-without-dp", lambda t: ["check", str(_config(t, "[dp]\nclip-norm = 2.0\n"))],
     ["dp.clip-norm", "dp.mode", "remove dp.clip-norm"]),
    ("dp-override-without-dp", lambda t: ["check", str(_config(t)), "--set", "dp.target-epsilon=3"],
     ["dp.target-epsilon", "dp.mode", "remove"]),
    ("trace-file-without-trace", lambda t: ["check", str(_config(t)), "--set", "participation.trace-file=x.npz"],
     ["participation.trace-file", "participation.model"]),
    ("spsa-settings-for-fedavg", lambda t: ["check", str(_config(t)), "--set", "spsa.eps=0.01"],
     ["spsa.eps", "strategy.name", "remove spsa.eps"]),
    ("min-clients-above-partitions", lambda t: ["check", str(_config(t)), "--set", "participation.model=uniform",
                                                "--set", "participation.min-clients=5"],
     ["participation.min-clients", "<= partition.num-partitions=3"]),
    ("nobody-ever-online", lambda t: ["check", str(_config(t)), "--set", "participation.model=uniform", "--set",
                                      "participation.fraction=0.01", "--set", "participation.min-clients=0"],
     ["participation.model='uniform' puts no client online", "raise the participation probabilities"]),
    ("client-dp-with-spsa", lambda t: ["check", str(_config(t)), "--set", "strategy.name=spsa", "--set",
                                       "dp.mode=client", "--set", "strategy.weighting=uniform"], ["dp.mode", "use dp.mode='sample' with strategy.name='spsa'"]),
    ("split-for-a-local-file", lambda t: ["check", str(_config(t)), "--set", "data.split=test"],
     ["data.split='test'", "data.dataset", "remove data.split"]),
    ("gpus-for-cpu-clients", lambda t: ["check", str(_config(t)), "--set", "model.device=cpu", "--set",
                                        "simulation.num-gpus-per-client=0.5"],
     ["simulation.num-gpus-per-client=0.5", "model.device='cpu'"]),
    ("more-cpus-than-the-machine", lambda t: ["check", str(_config(t)), "--set",
                                              f"simulation.num-cpus-per-client={(os.cpu_count() or 1) + 1}"],
     ["simulation.num-cpus-per-client", "no client could start; set it <="]),
    # --- data files and columns
    ("csv-missing", lambda t: ["check", str(_config(t, data=t / "gone.csv"))], ["gone.csv", "give an existing file"]),
    ("text-column-missing", lambda t: ["check", str(_config(t)), "--set", "data.text-column=review"],
     ["data.text-column='review'", "set data.text-column"]),
    ("label-column-missing", lambda t: ["check", str(_config(t)), "--set", "data.label-column=stars"],
     ["data.label-column='stars'", "set data.label-column"]),
    ("blank-label", lambda t: ["check", str(_config(t, data=_csv(t / "b.csv", _rows(blank_label_at=2))))],
     ["b.csv", "'label'", "data row 3 (line 4)", "fill or delete"]),
    ("blank-text", lambda t: ["check", str(_config(t, data=_csv(t / "b.csv", _rows(blank_text_at=0))))],
     ["b.csv", "'text'", "data row 1", "fill or delete"]),
    ("csv-latin1", lambda t: ["check", str(_config(t, data=_csv(t / "l.csv", _rows(word="café"), encoding="latin-1")))],
     ["l.csv", "not UTF-8", "re-save it as UTF-8"]),
    ("csv-header-only", lambda t: ["check", str(_config(t, data=_csv(t / "h.csv", [])))], ["h.csv", "no data rows"]),
    ("one-label", lambda t: ["check", str(_config(t, data=_csv(t / "o.csv", _rows(one_label=True))))],
     ["data.label-column='label'", "fewer than 2 distinct labels"]),
    ("train-size-too-big", lambda t: ["check", str(_config(t)), "--set", "data.num-train-examples=500"],
     ["data.num-train-examples=500", "the maximum is 50"]),
    ("test-size-too-big", lambda t: ["check", str(_config(t)), "--set", "data.num-test-examples=30"],
     ["data.num-test-examples=30", "the maximum is 12"]),
    ("json-garbage", lambda t: ["check", str(_config(t, data=_blank(t / "d.json", "{not json")))],
     ["d.json", "could not be read as json"]),
    # --- partitions
    ("more-partitions-than-rows", lambda t: ["check", str(_config(t)), "--set", "partition.num-partitions=41"],
     ["partition.num-partitions=41", "set partition.num-partitions <= 40"]),
    ("min-partition-size-infeasible", lambda t: ["check", str(_config(t)), "--set", "partition.scheme=dirichlet",
                                                 "--set", "partition.min-partition-size=20"],
     ["partition.min-partition-size=20", "the maximum is 13"]),
    ("batch-larger-than-every-partition", lambda t: ["check", str(_config(t)), "--set", "train.batch-size=64"],
     ["train.batch-size=64", "set train.batch-size <= 14"]),
    # --- model folders
    ("model-path-missing", lambda t: ["check", str(_config(t)), "--set", f'model.name="{t / "nomodel"}"'],
     ["nomodel", "pass an existing folder"]),
    ("model-no-config", lambda t: ["check", str(_config(t)), "--set", f'model.name="{_model_folder(t, {"x.txt": ""})}"'],
     ["model", "no config.json"]),
    ("model-no-weights", lambda t: ["check", str(_config(t)), "--set",
                                    f'model.name="{_model_folder(t, {"config.json": "{}"})}"'],
     ["model", "no weights", "save_pretrained"]),
    ("model-hub-id-offline", lambda t: ["check", str(_config(t)), "--set", "model.name=nobody-xyz/no-such-model"],
     ["nobody-xyz/no-such-model", "cannot be read"]),
    ("target-module-typo", lambda t: ["check", str(_config(t)), "--set", 'peft.target-modules="querry,value"'],
     ["['querry']", "named dense, key, query, value", "fix the spelling"]),
    ("lora-layer-out-of-range", lambda t: ["check", str(_config(t)), "--set", 'peft.layers="5,7"'],
     ["peft.layers [7]", "layers 0..5"]),
    ("seq-len-above-positions", lambda t: ["check", str(_config(t)), "--set", "data.max-seq-len=1000"],
     ["data.max-seq-len=1000", "set data.max-seq-len <= 512"]),
    ("label-prompts-wrong-labels", lambda t: ["check", str(_config(t)), "--set", "model.pooling=mean", "--set",
                                              "model.head-init=prompts", "--set",
                                              'model.label-prompts="fresh=good; rotten=bad"'],
     ["model.label-prompts", "missing ['neg', 'pos']"]),
    # --- participation traces
    ("trace-missing", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                 f'participation.trace-file="{t / "no.npz"}"'],
     ["participation.trace-file", "no.npz", "earlier run's results.json"]),
    ("trace-garbage", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                 f'participation.trace-file="{_blank(t / "g.npz", "hello")}"'],
     ["g.npz", "not a participation trace", "save_trace"]),
    ("trace-wrong-clients", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                       f'participation.trace-file="{_trace(t, np.ones((2, 5)))}"'],
     ["trace.npz", "2 rounds x 5 clients", "partition.num-partitions=3"]),
    ("trace-too-short", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                   f'participation.trace-file="{_trace(t, np.ones((1, 3)))}"'],
     ["trace.npz", "num-rounds=2"]),
    ("trace-not-binary", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                    f'participation.trace-file="{_trace(t, np.full((2, 3), 2))}"'],
     ["trace.npz", "0/1"]),
    ("trace-json-without-trace", lambda t: ["check", str(_config(t)), "--set", "participation.model=trace", "--set",
                                            f'participation.trace-file="{_blank(t / "r.json", "{}")}"'],
     ["r.json", "not a participation trace"]),
    # --- privacy budget
    ("epsilon-unreachable", lambda t: ["check", str(_config(t)), "--set", "dp.mode=client", "--set",
                                       "strategy.weighting=uniform", "--set", "dp.target-epsilon=1e-9"],
     ["dp.target-epsilon=1e-09", "raise dp.target-epsilon"]),
    ("delta-too-large", lambda t: ["check", str(_config(t)), "--set", "dp.mode=sample", "--set", "dp.delta=0.5"],
     ["dp.delta=0.5", "set dp.delta <"]),
    # --- output folders
    ("out-is-a-file", lambda t: ["simulate", str(_config(t)), "--out", str(_blank(t / "f.txt", "x"))],
     ["--out", "f.txt", "is a file"]),
    ("out-under-a-file", lambda t: ["simulate", str(_config(t)), "--out", str(_blank(t / "f.txt", "x") / "run")],
     ["f.txt", "pass a folder path"]),
    ("out-holds-a-run", lambda t: ["simulate", str(_config(t)), "--out", str(_earlier_run(t))],
     ["--out", "holds an earlier run", "--overwrite"]),
    ("out-holds-other-files", lambda t: ["simulate", str(_config(t)), "--out", str(_other_folder(t))],
     ["--out", "holds no fedpeft run", "choose a new or empty folder"]),
    ("out-unwritable", lambda t: ["simulate", str(_config(t)), "--out", "/proc/fedpeft-run"],
     ["/proc/fedpeft-run", "choose a writable --out"]),
    # --- plot inputs
    ("plot-input-missing", lambda t: ["plot", str(t / "none"), "--out", str(t / "p.png")], ["none", "pass a run folder"]),
    ("plot-input-not-json", lambda t: ["plot", str(_blank(t / "x.json", "hello")), "--out", str(t / "p.png")],
     ["x.json", "not JSON"]),
    ("plot-input-not-results", lambda t: ["plot", str(_blank(t / "x.json", '{"a": 1}')), "--out", str(t / "p.png")],
     ["x.json", "pass a run's results.json"]),
    ("plot-out-folder-missing", lambda t: ["plot", str(_earlier_run(t)), "--out", str(t / "nodir" / "p.png")],
     ["nodir", "create it first"]),
    ("plot-out-bad-suffix", lambda t: ["plot", str(_earlier_run(t)), "--out", str(t / "p.txt")],
     ["p.txt", "must end in .png"]),
    ("plot-metric-absent", lambda t: ["plot", str(_earlier_run(t)), "--out", str(t / "p.png"), "--metric", "f1"],
     ["no 'f1' in any round", "its rows have: accuracy"]),
    ("plot-target-impossible", lambda t: ["plot", str(_earlier_run(t)), "--out", str(t / "p.png"), "--target", "1.5"],
     ["--target 1.5", "pass a value in (0, 1]"]),
]  # fmt: skip


def _blank(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _rows(blank_label_at: int = -1, blank_text_at: int = -1, word: str = "good", one_label: bool = False):
    rows = []
    for i in range(60):
        label = "pos" if (i % 2 or one_label) else "neg"
        rows.append(("" if i == blank_text_at else f"snippet {i} is {word}", "" if i == blank_label_at else label))
    return rows


def _earlier_run(tmp: Path) -> Path:
    run = tmp / "earlier"
    run.mkdir(exist_ok=True)
    results = {"status": "completed", "config": {"name": "x", "seed": 0}, "rounds": [{"round": 0, "accuracy": 0.5}]}
    (run / "results.json").write_text(json.dumps(results))
    return run


def _other_folder(tmp: Path) -> Path:
    folder = tmp / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


@pytest.mark.parametrize("setup, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_exits_2_with_a_message_naming_the_key_or_file_and_the_fix(setup, fragments, tmp_path, capsys):
    argv = setup(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("fedpeft: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_there_are_at_least_forty_bad_inputs():
    assert len(CASES) >= 40


def test_a_good_config_prints_config_ok_with_the_partition_sizes_and_trainable_parameters(tmp_path, capsys):
    assert main(["check", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    # 60 rows: 12 held out (60 // 5 >= 10 asked -> 10), 40 of the remaining 50 split IID into 14 / 13 / 13
    assert out.startswith("config OK")
    assert "examples per partition min/median/max 13/13/14" in out
    # LoRA r=8 (in + out) on query/key/value/attention dense (384 -> 384), intermediate and output dense
    # (384 <-> 1536) of 6 layers, the pooler's dense (384 -> 384), and the 2 x 384 + 2 head: 338,690
    assert f"{6 * 8 * (4 * 768 + 2 * 1920) + 8 * 768 + 770:,} trainable parameters" in out
    assert "privacy: off" in out


def test_a_dp_setting_carried_by_the_file_is_a_warning_when_the_switch_is_turned_off_on_the_command_line(
    tmp_path, capsys
):
    cfg = _config(tmp_path, '[dp]\nmode = "sample"\ntarget-epsilon = 8.0\n')
    assert main(["check", str(cfg), "--set", "dp.mode=none"]) == 0
    out = capsys.readouterr().out
    assert "warning: dp.target-epsilon=8.0 has no effect because dp.mode='none'" in out


def test_a_failed_rerun_leaves_the_earlier_results_in_place(tmp_path, capsys):
    run = _earlier_run(tmp_path)
    before = (run / "results.json").read_bytes()
    bad = _config(tmp_path, data=tmp_path / "gone.csv")
    assert main(["simulate", str(bad), "--out", str(run), "--overwrite"]) == 2
    assert "gone.csv" in capsys.readouterr().err
    assert (run / "results.json").read_bytes() == before


NO_RAY_SCRIPT = """
import sys
from simulations.run import main
codes = [main(argv) for argv in {argvs!r}]
print(codes, "ray" in sys.modules, "flwr.simulation" in sys.modules)
"""


def test_the_check_path_never_imports_ray_or_flowers_simulation_engine(tmp_path):
    cfg = str(_config(tmp_path))
    argvs = [
        ["check", cfg],
        ["check", cfg, "--set", 'peft.target-modules="querry,value"'],
        ["check", cfg, "--set", "data.text-column=review"],
        ["simulate", cfg, "--set", "train.lr=inf"],
        ["simulate", cfg, "--set", "dp.target-epsilon=3"],
        ["simulate", cfg, "--out", str(_earlier_run(tmp_path))],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_RAY_SCRIPT.format(argvs=argvs)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[0, 2, 2, 2, 2, 2] False False", proc.stderr[-2000:]


def test_injecting_lora_with_a_target_that_matches_no_module_names_the_entry_and_the_candidates():
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedpeft.adapters import inject_adapters
    from fedpeft.backbone import resolve_model_path
    from fedpeft.config import ConfigError, PeftConfig

    config = AutoConfig.from_pretrained(resolve_model_path("embedded"), num_labels=2)
    with torch.device("meta"):  # module names without weights
        model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(
        ConfigError, match=r"\['querry'\] match no module .* named classifier, dense, key, query, value"
    ):
        inject_adapters(model, PeftConfig(target_modules="querry,value"))


def test_the_check_treats_the_same_file_suffixes_as_local_data_as_the_loader(tmp_path):
    from fedpeft.data import LOCAL_SUFFIXES
    from fedpeft.dead_settings import is_file_or_embedded

    for suffix in LOCAL_SUFFIXES:
        assert is_file_or_embedded(str(tmp_path / f"d{suffix}"))
    assert not is_file_or_embedded("imdb")
