"""Every federated mechanism on the causal-LM task: a 2-round tiny-Llama federation each, in process.

One helper (:func:`run_lm`) runs the real ServerApp and ClientApp code through
``simulations.inprocess.run_in_process`` on the tiny random Llama of tests/lm_helpers.py
(2 layers, hidden 64, SmolLM2's tokenizer), shrunk to 3 clients x 1 local step of 4 prompts;
the table below names each mechanism's settings and the check of its run. The checks are
hand-computed from the tiny model's shapes (bytes, ranks, DP noise) or compare two runs
(resume), so a mechanism that silently does nothing on a causal LM fails here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.results import load_results
from simulations.inprocess import run_in_process
from tests.lm_helpers import tiny_lm_config

# 3 clients, 2 rounds, 1 local AdamW step of 4 prompts, 8 held-out prompts, no sample generations.
SHRINK = {
    "data.num-train-examples": 24,
    "data.num-test-examples": 8,
    "partition.min-partition-size": 2,
    "train.local-steps": 1,
    "train.batch-size": 4,
    "task.num-sample-generations": 0,
    "task.max-new-tokens": 2,
}

# LoRA r 8 on q, k, v, o (64->64, 64->32, 64->32, 64->64), gate, up (64->128), down (128->64): A is r x in,
# B is out x r, so a layer holds r * sum(in + out) = r * 1024 parameters; 2 layers, fp32.
PARAMS_PER_RANK = 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
LORA_BYTES = 4 * 8 * PARAMS_PER_RANK  # 65,536 bytes per client and direction at rank 8


def run_lm(tmp_path: Path, name: str, *, client_mods: list | None = None, **overrides) -> dict:
    """Run the shrunk tiny-LM federation with ``overrides`` in ``tmp_path/name``; return its results."""
    cfg = tiny_lm_config(**{**SHRINK, **overrides})
    return load_results(run_in_process(cfg, tmp_path / name, client_mods=client_mods))


def trained(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["round"] > 0]


def check_ledger(results: dict, run_dir: Path) -> None:
    """FedAvg: every message carries exactly the LoRA factors, 65,536 bytes, both ways; the ledger agrees."""
    assert PARAMS_PER_RANK * 8 == results["trainable_params"] == 16_384
    for row in trained(results["rounds"]):
        assert row["aggregated"] == [0, 1, 2]
        assert row["uplink_payload_bytes"] == row["downlink_payload_bytes"] == 3 * LORA_BYTES
        assert row["uplink_message_bytes"] > row["uplink_payload_bytes"]  # keys, .npy headers, metrics
    ledger = json.loads((run_dir / "checkpoint.json").read_text())["ledger"]
    train_rows = [r for r in ledger if r["kind"] == "train"]
    assert len(train_rows) == 2 * 3 * 2 and all(r["payload_bytes"] == LORA_BYTES for r in train_rows)
    assert results["rounds"][-1]["loss"] < results["rounds"][0]["loss"]  # the response loss falls


def check_fedau_by_category(results: dict, run_dir: Path) -> None:
    """FedAU on the dialog corpus split by category: one category per client, p_n keyed on it."""
    hist = np.array(results["label_histograms"])
    assert hist.shape == (10, 10) and ((hist > 0).sum(axis=1) == 1).all()  # natural-id: one category each
    probabilities = np.array(results["participation_probabilities"])
    assert len(set(probabilities.round(6))) > 2  # participation correlated with the category
    trace = np.array(results["participation_trace"], dtype=bool)
    for row in trained(results["rounds"]):
        online = np.flatnonzero(trace[row["round"] - 1]).tolist()
        assert row["participants"] == online and row["aggregated"] == online
        assert set(row["omega"]) == {str(p) for p in online}  # FedAU's weight of every aggregated client
        assert row["uplink_payload_bytes"] == len(online) * LORA_BYTES
        assert row["accuracy"] is None and math.isfinite(row["perplexity"])  # free-form replies: no label words


def check_rank_tiers(results: dict, run_dir: Path) -> None:
    """HetLoRA / FlexLoRA: clients train ranks 2, 4, 8 and send exactly their own factors; the server keeps 8."""
    assert results["client_ranks"] == [2, 4, 8]
    for row in trained(results["rounds"]):
        expected = 4 * (2 + 4 + 8) * PARAMS_PER_RANK  # 114,688 bytes
        assert row["uplink_payload_bytes"] == row["downlink_payload_bytes"] == expected
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {v.shape for k, v in adapter.items() if "q_proj.lora_A" in k} == {(8, 64)}


def check_client_dp(results: dict, run_dir: Path) -> None:
    """DP-FedAvg: each delta clipped to C = 0.5, noise std sigma C / m = 0.5 * 0.5 / 3, epsilon reported."""
    from fedpeft.privacy import epsilon_from_history

    for row in trained(results["rounds"]):
        assert row["dp_noise_std"] == pytest.approx(0.5 * 0.5 / 3)
        assert row["dp_clipped"] == sum(n > 0.5 for n in row["dp_clip_norms"])
        # every client is sampled (rate 1): epsilon after r rounds is the RDP accountant's for r releases
        assert row["epsilon"] == pytest.approx(epsilon_from_history([(0.5, 1.0, row["round"])], 1e-5), rel=1e-6)
    assert 0 < trained(results["rounds"])[0]["epsilon"] < trained(results["rounds"])[1]["epsilon"]


def check_sample_dp(results: dict, run_dir: Path) -> None:
    """DP-SGD with Opacus on each client: its epsilon is the accountant's for (sigma, rate, steps) so far."""
    from fedpeft.privacy import epsilon_from_history

    sizes = results["partitions"]["sizes"]
    for row in trained(results["rounds"]):
        for client in row["clients"]:
            rate = 1.0 / math.ceil(sizes[client["partition_id"]] / 4)
            want = epsilon_from_history([(0.5, rate, row["round"])], 1e-5)
            assert client["dp-sample-rate"] == pytest.approx(rate)
            assert client["epsilon"] == pytest.approx(want, rel=1e-6)
        assert row["uplink_payload_bytes"] == 3 * LORA_BYTES


def check_faults(results: dict, run_dir: Path) -> None:
    """Every planned fault is recorded in its round as failed or rejected; the global state stays finite."""
    from fedpeft.config import ExperimentConfig
    from simulations.faults import planned_fault
    from simulations.resume import read_checkpoint

    cfg = ExperimentConfig.from_flat(results["config"])
    injected = 0
    for row in trained(results["rounds"]):
        failed = {f["partition_id"] for f in row["failed"]}
        rejected = {f["partition_id"] for f in row["rejected"]}
        for pid in row["participants"]:
            kind = planned_fault(cfg, row["round"], pid)
            injected += kind not in (None, "slow")
            if kind == "crash":
                assert pid in failed, (row["round"], pid, kind)
            elif kind in ("nan", "inf", "shape", "metrics"):
                assert pid in rejected, (row["round"], pid, kind)
            else:
                assert pid in row["aggregated"], (row["round"], pid, kind)
        assert row["uplink_payload_bytes"] >= LORA_BYTES * len(row["aggregated"])
        assert math.isfinite(row["loss"])
    assert injected >= 4  # seed 0 at rate 0.8: crash + inf in round 1, shape + metrics in round 2
    _, state, _ = read_checkpoint(run_dir)
    assert all(np.isfinite(v).all() for v in state.values())


def check_server_adam(results: dict, run_dir: Path) -> None:
    """FedAdam on -Delta: its moments are checkpointed beside the global adapter; the loss falls."""
    from simulations.resume import read_checkpoint

    meta, state, extra = read_checkpoint(run_dir)
    assert meta["round"] == 2 and meta["strategy"]["server_update"] == {"optimizer": "adam"}
    for moment in ("m", "v"):  # Adam's first and second moments, one per adapter tensor
        moments = {k.removeprefix(f"server_update/{moment}/"): v for k, v in extra.items() if f"/{moment}/" in k}
        assert moments.keys() == state.keys() and any(float(abs(v).max()) > 0 for v in moments.values())
    assert results["rounds"][-1]["loss"] < results["rounds"][0]["loss"]


def check_spsa(results: dict, run_dir: Path) -> None:
    """One-byte shared-seed SPSA on prompt + label words: 1 byte per step per client, the loss falls."""
    for row in trained(results["rounds"]):
        assert row["aggregated"] == [0, 1, 2]
        assert row["uplink_payload_bytes"] == 3 * 4  # 4 steps x one int8 code, 3 clients
        assert row["train_metrics"].get("spsa-desync", 0) == 0
    assert results["rounds"][-1]["loss"] < results["rounds"][0]["loss"]


SPSA = {
    "strategy.name": "spsa",
    "train.local-steps": 0,  # SPSA clients read spsa.*
    "spsa.local-steps": 4,
    "spsa.batch-size": 4,
    "spsa.lr": 1e-2,
    "spsa.eps": 1e-2,
}
ADAM = {"strategy.server-optimizer": "adam", "strategy.server-lr": 0.01}

MECHANISMS: dict[str, tuple[dict, Callable[[dict, Path], None]]] = {
    "fedavg-ledger": ({}, check_ledger),
    "fedau-dialog-categories": (
        {
            "strategy.name": "fedau",
            "data.dataset": "embedded-dialog",
            "task.label-words": "",
            "data.num-train-examples": 400,  # every one of the ten categories present
            "partition.scheme": "natural-id",
            "partition.num-partitions": 10,
            "participation.model": "bernoulli",
            "participation.p-source": "label-correlated",
            "participation.p-mean": 0.4,
        },
        check_fedau_by_category,
    ),
    "hetlora": ({"strategy.name": "hetlora", "clients.rank-profile": "2,4,8"}, check_rank_tiers),
    "flexlora": ({"strategy.name": "flexlora", "clients.rank-profile": "2,4,8"}, check_rank_tiers),
    "client-dp": (
        {"dp.mode": "client", "strategy.weighting": "uniform", "dp.noise-multiplier": 0.5, "dp.clip-norm": 0.5},
        check_client_dp,
    ),
    "sample-dp": ({"dp.mode": "sample", "dp.noise-multiplier": 0.5, "dp.clip-norm": 1.0}, check_sample_dp),
    # "hang" waits out the round timeout (tests/test_faults.py covers it); the other kinds cost nothing extra
    "faults": (
        {"faults.rate": 0.8, "faults.kinds": "crash,nan,inf,shape,metrics,slow", "faults.slow-s": 0.01},
        check_faults,
    ),
    "server-adam": (ADAM, check_server_adam),
    "spsa": (SPSA, check_spsa),
}


@pytest.fixture(scope="module")
def mechanism_runs(tmp_path_factory) -> Callable[[str], tuple[dict, Path]]:
    """``run(name)``: the results and folder of MECHANISMS[name]'s run, run once per module (resume reuses one)."""
    root = tmp_path_factory.mktemp("lm-mechanisms")
    done: dict[str, tuple[dict, Path]] = {}

    def run(name: str) -> tuple[dict, Path]:
        if name not in done:
            done[name] = (run_lm(root, name, **MECHANISMS[name][0]), root / name)
        return done[name]

    return run


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_a_mechanism_runs_a_tiny_causal_lm_federation_and_does_what_it_says(mechanism_runs, name):
    results, run_dir = mechanism_runs(name)
    assert results["status"] == "completed", results.get("error")
    MECHANISMS[name][1](results, run_dir)


class Killed(BaseException):
    """Stands in for SIGKILL: no handler of the app catches it, so the run stops mid-round as a killed process."""


def kill_in_round(server_round: int):
    """A ClientApp mod that kills the run when round ``server_round``'s first train message arrives."""

    def mod(msg, context, call_next):
        if msg.metadata.message_type.startswith("train") and int(msg.content["config"]["server-round"]) == server_round:
            raise Killed
        return call_next(msg, context)

    return mod


def test_a_causal_lm_run_killed_in_round_two_resumes_bit_identically(tmp_path, mechanism_runs):
    """FedAdam's moments, the ledger and the global LoRA factors come back from round 1's checkpoint."""
    reference, reference_dir = mechanism_runs("server-adam")  # the same settings, never interrupted
    with pytest.raises(Killed):
        run_lm(tmp_path, "killed", client_mods=[kill_in_round(2)], **ADAM)
    assert load_results(tmp_path / "killed" / "results.json")["status"] == "running"  # as a SIGKILL leaves it

    cfg = tiny_lm_config(**{**SHRINK, **ADAM})
    resumed = load_results(run_in_process(cfg, tmp_path / "killed", resume=True))

    assert resumed["status"] == "completed" and resumed["resumed_after_rounds"] == [1]
    keys = ("loss", "accuracy", "perplexity", "participants", "aggregated", "uplink_payload_bytes")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs["rounds"]]  # noqa: E731
    assert strip(resumed) == strip(reference)
    train_rows = lambda rs: [r for r in rs["ledger"] if r["kind"] == "train"]  # noqa: E731 (a resume re-handshakes)
    assert train_rows(resumed) == train_rows(reference)
    a = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    b = load_file(reference_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fedprox_reaches_the_lm_clients_and_adds_its_pull_to_the_second_sgd_step(tmp_path, fresh_task):
    """With SGD the first step is plain (w = w_global), the second adds mu (w1 - w_global):
    delta_prox = delta_plain - lr mu delta_1, exactly, where delta_1 is the one-step delta."""
    from fedpeft.drift import DriftCorrection

    seen = []

    def record_mu(msg, context, call_next):
        if msg.metadata.message_type.startswith("train"):
            seen.append(msg.content["config"].get("prox-mu"))
        return call_next(msg, context)

    results = run_lm(tmp_path, "fedprox", client_mods=[record_mu], **{"train.prox-mu": 0.5})
    assert results["status"] == "completed" and seen == [0.5] * 6  # 3 clients x 2 rounds

    lr, mu = 0.5, 4.0
    sgd = {**SHRINK, "train.optimizer": "sgd", "train.lr": lr}
    one = fresh_task(tiny_lm_config(**sgd))
    delta_1, _ = one.local_update(one.initial_state, 0, 1)
    two = fresh_task(tiny_lm_config(**{**sgd, "train.local-steps": 2}))
    plain, _ = two.local_update(two.initial_state, 0, 1)
    prox, _ = two.local_update(two.initial_state, 0, 1, correction=DriftCorrection(prox_mu=mu))
    pull = max(float(abs(lr * mu * delta_1[k]).max()) for k in delta_1)
    assert pull > 1e-4
    for key in plain:
        np.testing.assert_allclose(prox[key], plain[key] - lr * mu * delta_1[key], atol=1e-4 * pull, rtol=0)


def write_alpaca(path: Path) -> Path:
    rows = [
        {"instruction": "Name a colour of the sky.", "response": "blue"},
        {"instruction": "Say hello in French.", "response": "bonjour"},
        {"instruction": "What is two plus two?", "input": "Answer with a word.", "response": "four"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_causal_lm_node_trains_on_its_own_instruction_file_and_its_loss_falls(tmp_path, fresh_task):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedpeft import adapters
    from fedpeft.records import state_to_record
    from simulations.client_app import train

    path = write_alpaca(tmp_path / "mine.jsonl")
    cfg = tiny_lm_config(**{**SHRINK, "train.local-steps": 3})
    task = fresh_task(cfg)
    rows = task.client_rows(0, str(path))
    assert [ex.response for ex in rows] == ["blue", "bonjour", "four"]
    assert rows[2].messages[-1]["content"] == "What is two plus two?\n\nAnswer with a word."  # Alpaca's layout

    # the ClientApp's train handler reads the node's file: 3 steps x its 3 rows, not 4 + 4 + 3 of partition 2 (11 rows)
    seen = {}
    for name, node in (("file", {"data-path": str(path)}), ("partition", {})):
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 2, "num-partitions": 3, **node},
            state=RecordDict(),
            run_config={},
        )
        content = RecordDict(
            {
                "arrays": state_to_record(task.initial_state),
                "config": ConfigRecord({"mode": "first-order", "server-round": 1}),
            }
        )
        seen[name] = train(content, context, cfg)["metrics"]["num-examples"]
    assert seen == {"file": 3 * 3, "partition": 4 + 4 + 3}

    loader = task.train_loader(rows, 0, 0)
    before = task.evaluate(task.initial_state, loader)["loss"]
    state = dict(task.initial_state)
    for round_ in (1, 2, 3):
        delta, _ = task.local_update(state, 0, round_, data_path=str(path))
        state = adapters.apply_delta(state, delta, 1.0)
    assert task.evaluate(state, loader)["loss"] < before - 0.3  # measured: 10.83 -> 10.40 in 9 steps


def test_a_node_instruction_file_that_is_missing_or_has_an_empty_response_is_refused(tmp_path, fresh_task):
    from fedpeft.config import ConfigError

    task = fresh_task(tiny_lm_config(**SHRINK))
    with pytest.raises(ConfigError, match="not a file on this node"):
        task.client_rows(0, str(tmp_path / "absent.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Say hi.", "response": " "}) + "\n")
    with pytest.raises(ConfigError, match="empty in data row 1"):
        task.client_rows(0, str(bad))


def test_spsa_steps_on_prompt_and_label_words_lower_the_label_word_loss(fresh_task):
    """MeZO's setting: the prompt, then the label word as the response; the loss is its cross-entropy."""
    from fedpeft import zo
    from fedpeft.spsa_update import spsa_local_update

    cfg = tiny_lm_config(**{**SHRINK, **SPSA, "spsa.local-steps": 12})
    task = fresh_task(cfg)
    rows = task.partition(0)
    assert {ex.response for ex in rows} <= {"positive", "negative"}
    loader = task.train_loader(rows, 0, 0)
    before = task.evaluate(task.initial_state, loader)["loss"]
    master = zo.to_master(task.initial_state)
    update = spsa_local_update(task, master, partition_id=0, round_=1, scale=1.0, lr=cfg.spsa.lr)
    assert len(update.result.codes) == 12 and update.result.skipped == 0
    after = task.evaluate(zo.to_state(master), loader)["loss"]
    assert after < before, (before, after)


def test_a_cohort_node_trains_its_lm_clients_one_after_another_with_the_same_numbers(tmp_path, mechanism_runs):
    """simulation.cohort-size = 3 on one Flower node (cohort-batched = false): each client's own local update."""
    alone, _ = mechanism_runs("fedavg-ledger")
    cohort = run_lm(tmp_path, "cohort", **{"simulation.cohort-size": 3, "simulation.cohort-batched": False})
    keys = ("loss", "accuracy", "perplexity", "aggregated", "uplink_payload_bytes", "downlink_payload_bytes")
    assert [{k: r[k] for k in keys} for r in cohort["rounds"]] == [{k: r[k] for k in keys} for r in alone["rounds"]]


def test_dpzero_per_example_losses_of_a_causal_lm_batch_average_to_its_response_loss(fresh_task):
    import torch

    from fedpeft.spsa_update import per_example_loss
    from fedpeft.train import batch_loss

    task = fresh_task(tiny_lm_config(**SHRINK))
    batch = next(iter(task.train_loader(task.partition(2), 1, 2)))
    with torch.no_grad():
        each = per_example_loss(task.model, batch)
        whole = batch_loss(task.model, batch)
    assert each.shape == (4,) and len(set(each.tolist())) == 4  # one loss per prompt, not one per token
    assert float(each.mean()) == pytest.approx(float(whole), rel=1e-6)
