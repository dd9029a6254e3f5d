"""SharedSeedSPSA: replay, catch-up, bytes on the wire, learning, and one Flower run."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft import comm, onebyte, zo
from fedpeft.records import record_to_state, state_to_record
from fedpeft.zo_log import unpack_header
from simulations.spsa_client import SYNC_KEY, THETA_KEY, catch_up
from strategies.base import KIND_SPSA
from strategies.spsa import SharedSeedSPSA, next_scale
from tests.helpers import tiny_config
from tests.replies import RoundReports, fake_reply

K = 6
INIT = {"lora_A": np.full((8, 16), 0.1, np.float32), "head.bias": np.zeros(2, np.float32)}
TARGET = {n: torch.linspace(-1, 1, int(np.prod(a.shape))).view(a.shape) for n, a in INIT.items()}
CFG = tiny_config(**{"spsa.local-steps": K, "spsa.lr": 0.05, "spsa.initial-scale": 4.0})


class FakeTask:
    initial_state = INIT


class FakeContext:
    def __init__(self):
        self.state = RecordDict()


def client_round(msg: Message, context: FakeContext, pid: int) -> tuple[Message, zo.Tensors]:
    """What simulations/spsa_client.spsa_train does, on a quadratic loss instead of MiniLM."""
    conf = msg.content["config"]
    scale, lr, want = unpack_header(conf["spsa-header"])
    master, _ = catch_up(msg.content, context, CFG, FakeTask())
    assert zo.state_hash(master) == want, "catch-up did not reach the server's state"
    start = zo.to_state(master)
    params = {n: t.clone() for n, t in master.items()}
    loss = lambda _b: sum(((params[n] - TARGET[n]) ** 2).sum() for n in params)  # noqa: E731
    result = zo.run_local_steps(
        params, master, [None], loss, run_seed=CFG.seed, round_=int(conf["server-round"]), partition_id=pid,
        num_steps=K, eps=1e-3, lr=lr, scale=scale, codec=CFG.spsa.codec,
    )  # fmt: skip
    codes = onebyte.to_bytes(result.codes)
    context.state[THETA_KEY] = state_to_record(start)
    context.state[SYNC_KEY] = ConfigRecord({"round": int(conf["server-round"]), "codes": codes})
    return fake_reply(msg, n=K, codes=codes), master


def make_strategy(**kw) -> SharedSeedSPSA:
    return SharedSeedSPSA(
        initial_state=INIT, run_seed=CFG.seed, local_steps=K, lr=0.05, initial_scale=4.0,
        partition_of=lambda node: node - 100, report=RoundReports(), **kw,
    )  # fmt: skip


def run_round(strategy, rnd, state, pids, contexts):
    strategy.node_selector = lambda r, grid: [100 + p for p in pids]
    msgs = list(strategy.configure_train(rnd, state_to_record(state), ConfigRecord(), grid=None))
    replies, finals = zip(*(client_round(m, contexts[p], p) for m, p in zip(msgs, pids, strict=True)), strict=True)
    arrays, _ = strategy.aggregate_train(rnd, list(replies))
    return record_to_state(arrays), msgs, finals


def test_server_replay_of_one_clients_codes_equals_that_clients_adapter_bit_for_bit(task_identity):
    strategy = make_strategy()
    new, _, finals = run_round(strategy, 1, INIT, [2], {2: FakeContext()})
    for name in INIT:
        assert np.array_equal(new[name], finals[0][name].numpy())
    assert strategy.log[0].weight == 1.0 and strategy.report.last["aggregated"] == [2]


def test_two_clients_are_averaged_with_weight_one_over_m(task_identity):
    strategy = make_strategy()
    new, _, finals = run_round(strategy, 1, INIT, [0, 1], {0: FakeContext(), 1: FakeContext()})
    assert strategy.log[0].weight == 0.5
    mean = {n: (finals[0][n].numpy() + finals[1][n].numpy()) / 2 for n in INIT}
    for name in INIT:  # FedAvg of the two local ZO updates, up to float32 rounding
        np.testing.assert_allclose(new[name], mean[name], atol=1e-6)


def test_present_and_late_clients_catch_up_to_the_servers_hash(task_identity):
    strategy, ctx = make_strategy(), {p: FakeContext() for p in range(4)}
    state = INIT
    for rnd, pids in enumerate([[0, 1], [0, 2], [1, 2]], start=1):
        state, msgs, _ = run_round(strategy, rnd, state, pids, ctx)
    # round 4: partition 2 was in round 3 (gets only partition 1's round-3 codes), partition 0 missed
    # round 3 (replays rounds 2-3), partition 3 never trained (replays 1-3 from the seeded start)
    strategy.node_selector = lambda r, grid: [100, 102, 103]
    msgs = list(strategy.configure_train(4, state_to_record(state), ConfigRecord(), grid=None))
    want = zo.state_hash(state)
    for msg, pid in zip(msgs, [0, 2, 3], strict=True):
        conf = msg.content["config"]
        assert "arrays" not in msg.content.array_records
        assert conf["spsa-base-round"] == {0: 2, 2: 3, 3: 1}[pid]
        master, how = catch_up(msg.content, ctx[pid], CFG, FakeTask())
        assert how == "log" and zo.state_hash(master) == want == unpack_header(conf["spsa-header"])[2]
    # the present client's download: 16 B header + 18 B round header + 4 B own marker + 4 + K codes
    assert comm.payload_bytes(msgs[1].content) == 16 + 18 + 4 + 4 + K
    assert strategy.hashes[4] == want.hex()


def test_a_client_the_server_cannot_vouch_for_gets_the_full_adapter(task_identity):
    strategy = make_strategy()
    state, _, _ = run_round(strategy, 1, INIT, [0], {0: FakeContext()})
    strategy.node_selector = lambda r, grid: [100]
    msg = list(strategy.configure_train(2, state_to_record(state), ConfigRecord(), grid=None))[0]
    # its round-1 reply was accepted, so a log would do; make the server forget instead
    strategy.synced[0] = None
    msg = list(strategy.configure_train(2, state_to_record(state), ConfigRecord(), grid=None))[0]
    assert comm.payload_bytes(msg.content) == 16 + 4 * 130
    master, how = catch_up(msg.content, FakeContext(), CFG, FakeTask())
    assert how == "full" and zo.state_hash(master) == zo.state_hash(state)


def test_uplink_payload_is_exactly_k_bytes_per_client_round(task_identity):
    strategy = make_strategy()
    strategy.node_selector = lambda r, grid: [100]
    msg = list(strategy.configure_train(1, state_to_record(INIT), ConfigRecord(), grid=None))[0]
    reply, _ = client_round(msg, FakeContext(), 0)
    assert comm.payload_bytes(reply.content) == K
    assert not reply.content.array_records


def test_wrong_length_or_desynced_replies_are_rejected_and_theta_is_untouched(task_identity):
    strategy = make_strategy()
    strategy.node_selector = lambda r, grid: [100, 101]
    msgs = list(strategy.configure_train(1, state_to_record(INIT), ConfigRecord(), grid=None))
    short = fake_reply(msgs[0], codes=b"\x01")
    desync = fake_reply(msgs[1], metrics={"spsa-desync": 1}, kind=KIND_SPSA)
    arrays, _ = strategy.aggregate_train(1, [short, desync])
    assert [r["partition_id"] for r in strategy.report.last["rejected"]] == [0, 1]
    assert zo.state_hash(record_to_state(arrays)) == zo.state_hash(INIT)
    assert strategy.synced == {0: None, 1: None}


def test_next_scale_is_three_times_the_median_absolute_decoded_gradient():
    assert next_scale(np.array([0.1, -0.2, 0.4]), 1.0, rule="median", multiplier=3.0) == pytest.approx(0.6)
    assert next_scale(np.zeros(3), 1.0, rule="median", multiplier=3.0) == 1.0
    assert next_scale(np.array([0.1]), 1.0, rule="fixed", multiplier=3.0) == 1.0


def test_one_byte_spsa_lowers_the_loss_of_a_digits_classifier():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-6), dtype=torch.float32)[:1000]
    y = torch.tensor(y)[:1000]
    start = {"w": np.zeros((10, 64), np.float32), "b": np.zeros(10, np.float32)}
    master = zo.to_master(start)
    params = {n: t.clone() for n, t in master.items()}
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 1000, 32)]

    def loss(batch):
        return torch.nn.functional.cross_entropy(batch[0] @ params["w"].T + params["b"], batch[1])

    result = zo.run_local_steps(
        params, master, batches, loss, run_seed=0, round_=1, partition_id=0, num_steps=1500,
        eps=1e-3, lr=2e-3, scale=10.0, codec="int8",
    )  # fmt: skip
    assert result.losses[:50].mean() > 2.2  # ln 10 = 2.30 at the zero start
    assert result.losses[-100:].mean() < 1.0


@pytest.mark.slow
def test_a_flower_simulation_with_spsa_sends_k_bytes_per_client_and_replays_to_the_same_hash(tmp_path):
    from fedpeft.results import load_results
    from fedpeft.tasks import load_task
    from fedpeft.zo_log import RoundLog, replay_round
    from simulations.run import simulate

    cfg = tiny_config(
        **{"strategy.name": "spsa", "num-rounds": 3, "spsa.local-steps": 4, "participation.model": "uniform",
           "participation.fraction": 0.5, "data.max-seq-len": 16, "spsa.batch-size": 8}
    )  # fmt: skip
    results = load_results(simulate(cfg, tmp_path / "spsa", plot=False))
    for row in results["rounds"][1:]:
        assert not row["rejected"] and not row["failed"]
        assert row["uplink_payload_bytes"] == 4 * len(row["aggregated"])
        assert row["downlink_payload_bytes"] < 4 * results["trainable_params"]
    log = results["strategy_state"]["log"]
    master = zo.to_master(load_task(cfg).initial_state)
    for e in log:
        entries = tuple((int(p), bytes.fromhex(c)) for p, c in e["codes"].items())
        replay_round(master, RoundLog(e["round"], e["scale"], e["lr"], e["weight"], entries), run_seed=0, codec="int8")
    assert zo.state_hash(master).hex() == results["strategy_state"]["state_hash"]["4"]


def test_spsa_on_the_top_layers_runs_through_the_prefix_cache_with_the_uncached_losses(tmp_path):
    from fedpeft.results import load_results
    from fedpeft.tasks import load_task
    from simulations.inprocess import run_in_process

    flat = {"strategy.name": "spsa", "num-rounds": 1, "spsa.local-steps": 3, "data.max-seq-len": 16,
            "spsa.batch-size": 8, "peft.layers": "4,5", "peft.target-modules": "value", "peft.lora-rank": 1}  # fmt: skip
    rows = {}
    for mode in ("auto", "off"):
        cfg = tiny_config(**flat, **{"train.prefix-cache": mode})
        cache = load_task(cfg).model.fedpeft_prefix_cache
        hits = cache.hits
        rows[mode] = load_results(run_in_process(cfg, tmp_path / mode))["rounds"][1]
        used = cache.hits > hits
        assert used == (mode == "auto"), (mode, cache.hits, hits)
    # The first step's loss is taken before any update: the cached prefix gives the same number.
    first = [row["train_metrics"]["train-loss-first"] for row in (rows["auto"], rows["off"])]
    assert first[0] == pytest.approx(first[1], abs=1e-5)


@pytest.mark.slow
def test_one_byte_spsa_lowers_the_held_out_loss_of_minilm_with_a_prompt_head():
    """The spsa_minilm setup (NF4 MiniLM, mean pooling, prompt head, LoRA on value + head), in-process."""
    from fedpeft import data
    from fedpeft.config import load_config
    from fedpeft.tasks import load_task
    from fedpeft.train import batch_loss

    cfg = load_config("simulations/configs/spsa_minilm.toml", {"data.num-test-examples": 256})
    task = load_task(cfg)
    model = task.model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    master = zo.to_master(task.initial_state)
    zo.copy_into_(params, master)
    test = list(task.test_loader())

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(batch_loss(model, b)) for b in test]))

    before = held_out_loss()
    loader = data.build_loader(
        task.splits.train, task.tokenizer, max_seq_len=24, batch_size=16, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    result = zo.run_local_steps(
        params, master, loader, lambda b: batch_loss(model, b), run_seed=0, round_=1, partition_id=0,
        num_steps=200, eps=1e-3, lr=2e-3, scale=1.0, codec="int8",
    )  # fmt: skip
    after = held_out_loss()
    assert result.codes.dtype == np.int8 and len(result.codes) == 200
    # measured here: 0.586 -> 0.569 on these 256 snippets (the 80-round federated run: 0.606 -> 0.552 on 500)
    assert after < before - 0.005


def _spsa_message(cfg, initial) -> RecordDict:
    """Round 1's train content as SharedSeedSPSA sends it to a client that gets the full adapter."""
    from fedpeft.zo_log import pack_header

    header = pack_header(1.0, cfg.spsa.lr, zo.state_hash(zo.to_master(initial)))
    conf = ConfigRecord({"mode": "spsa", "server-round": 1, "spsa-header": header})
    return RecordDict({"arrays": state_to_record(initial), "config": conf})


def test_an_spsa_client_with_a_data_path_trains_on_its_own_file_not_the_bundled_partition(tmp_path):
    # 3 rows in the node's file, batch 8: each of the K = 2 steps sees the 3 rows (6 examples);
    # the bundled partition 0 of the tiny config holds ~32 rows, so it would show 2 x 8 = 16.
    from flwr.app import Context

    from fedpeft.tasks import load_task
    from simulations.spsa_client import spsa_train

    cfg = tiny_config(**{"strategy.name": "spsa", "spsa.local-steps": 2, "spsa.batch-size": 8, "data.max-seq-len": 16})
    path = tmp_path / "mine.csv"
    path.write_text("text,label\ngreat film,fresh\ndull,rotten\nfine,fresh\n")
    initial = load_task(cfg).initial_state
    seen = {}
    for name, node in (("file", {"data-path": str(path)}), ("partition", {})):
        node_config = {"partition-id": 0, "num-partitions": 3, **node}
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        reply = spsa_train(_spsa_message(cfg, initial), context, cfg)
        seen[name] = reply["metrics"]["num-examples"]
        assert len(bytes(reply["spsa"]["codes"])) == 2
    assert seen == {"file": 2 * 3, "partition": 2 * 8}
