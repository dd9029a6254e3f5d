"""``fedpeft check``'s trainable counts and bytes per client-round, against the real model and messages."""

from flwr.app import RecordDict

from fedpeft import adapters
from fedpeft.check import check_experiment, check_model
from fedpeft.check_size import payload_bytes_per_client_round, rank_tiers
from fedpeft.comm import payload_bytes
from fedpeft.records import state_to_record
from fedpeft.tasks import load_task
from tests.helpers import tiny_config

# MiniLM: "query,key,value,dense" adapts query/key/value/attention.output.dense (384 -> 384),
# intermediate.dense (384 -> 1536) and output.dense (1536 -> 384) in 6 layers, and the pooler's dense (384 -> 384).
B_ROWS_PER_SLICE = 6 * (4 * 384 + 1536 + 384) + 384  # out features: B is out x r
A_COLUMNS_PER_SLICE = 6 * (4 * 384 + 384 + 1536) + 384  # in features: A is r x in
HEAD = 384 * 2 + 2  # classifier over two labels


def test_the_check_counts_only_b_and_the_head_for_ffa_as_the_real_model_trains_and_sends():
    cfg = tiny_config(**{"peft.lora-variant": "ffa"})
    by_hand = 8 * B_ROWS_PER_SLICE + HEAD
    facts = check_model(cfg, num_labels=2)
    assert facts.trainable == by_hand == 169_730
    assert check_model(tiny_config(), num_labels=2).trainable == by_hand + 8 * A_COLUMNS_PER_SLICE  # LoRA sends A too

    task = load_task(cfg)
    assert adapters.num_trainable(task.model) == by_hand
    down = RecordDict({"arrays": state_to_record(task.initial_state)})
    delta, _ = task.local_update(task.initial_state, partition_id=0, round_=1)
    up = RecordDict({"arrays": state_to_record(delta)})
    assert payload_bytes(down) == payload_bytes(up) == 4 * by_hand
    assert payload_bytes_per_client_round(facts.trainable) == 4 * by_hand

    text = check_experiment(cfg).text()
    assert "(FFA: A frozen, only B and the head travel): 169,730 trainable parameters, " in text
    assert "678,920 payload bytes each way per client-round" in text


def test_the_check_gives_every_rank_tier_the_count_its_clients_train():
    cfg = tiny_config(**{"strategy.name": "hetlora", "clients.rank-profile": "2,4,8"})
    facts = check_model(cfg, num_labels=2)
    assert facts.trainable_by_rank == {r: r * (A_COLUMNS_PER_SLICE + B_ROWS_PER_SLICE) + HEAD for r in (2, 4, 8)}

    task = load_task(cfg)
    try:
        for rank in (2, 4, 8):
            adapters.use_rank(task.model, rank)
            assert adapters.num_trainable(task.model) == facts.trainable_by_rank[rank]
    finally:
        adapters.use_rank(task.model, cfg.peft.lora_rank)  # the model is cached: leave the server's rank active
    text = check_experiment(cfg).text()
    assert "rank 2: 85,250 / 341,000, rank 4: 169,730 / 678,920, rank 8: 338,690 / 1,354,760" in text


def test_memory_budgets_list_every_candidate_rank_and_one_rank_lists_itself():
    mem = tiny_config(**{"strategy.name": "hetlora", "clients.rank-profile": "mem:60,80,120"})
    assert rank_tiers(mem)[0] == [1, 2, 4, 8]
    assert rank_tiers(tiny_config())[0] == [8]
