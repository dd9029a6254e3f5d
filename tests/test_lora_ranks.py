"""Client side of FFA-LoRA and per-client LoRA ranks, on the real embedded backbone."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import adapters, backbone
from fedpeft.config import ConfigError, load_config
from fedpeft.ranks import candidate_ranks, client_ranks
from fedpeft.tasks import load_task
from fedpeft.train import forward_logits
from strategies.lora_hetero import slice_rank, state_rank
from tests.helpers import tiny_config

HET = {"strategy.name": "hetlora"}
ROOT = Path(__file__).resolve().parents[1]


def _lora_a(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if ".lora_A.default." in n}


def _logits(task):
    with torch.no_grad():
        return forward_logits(task.model, next(iter(task.test_loader())))


def test_ffa_freezes_a_so_only_b_and_the_head_travel_and_a_is_the_same_on_every_build(empty_model_cache):
    cfg = tiny_config(**{"peft.lora-variant": "ffa"})
    first = load_task(cfg)
    a_first = _lora_a(first.model)
    state = adapters.get_adapter_state(first.model)
    assert a_first and not any(".lora_A." in k for k in state)
    assert all(".lora_B." in k or ".classifier." in k for k in state)
    lora = load_task(tiny_config())  # plain LoRA: A travels too, so FFA sends A's share less
    a_numel = sum(v.size for v in a_first.values())
    assert adapters.num_trainable(lora.model) - adapters.num_trainable(first.model) == a_numel
    delta, _ = first.local_update(first.initial_state, partition_id=0, round_=1)
    assert delta.keys() == state.keys()
    backbone.clear_cache()  # another client process builds its own model from the seed
    second = load_task(cfg)
    for name, arr in _lora_a(second.model).items():
        np.testing.assert_array_equal(arr, a_first[name])  # bit-identical, and untouched by training


def test_an_ffa_export_carries_the_seeded_a_and_reloads_with_the_same_logits(tmp_path, fresh_task):
    from peft import PeftModel

    cfg = tiny_config(**{"peft.lora-variant": "ffa"})
    task = fresh_task(cfg)
    rng = np.random.default_rng(0)
    trained = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in task.initial_state.items()}
    adapters.set_adapter_state(task.model, trained)
    expected = _logits(task)
    out = adapters.export_adapter(task.model, tmp_path / "ffa", cfg.peft)
    reloaded = PeftModel.from_pretrained(backbone.load_backbone(cfg.model, num_labels=2, seed=5), str(out)).eval()
    for name, arr in _lora_a(reloaded).items():
        np.testing.assert_array_equal(arr, _lora_a(task.model)[name])
    with torch.no_grad():
        got = forward_logits(reloaded, next(iter(task.test_loader())))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_process_builds_the_backbone_once_for_clients_of_three_ranks(empty_model_cache):
    cfg = tiny_config(**{"clients.rank-profile": "2,4,8", "strategy.name": "hetlora"})
    builds = backbone.BUILD_COUNT["n"]
    task = load_task(cfg)
    base_weight = task.model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    for pid, rank in enumerate(task.client_ranks()):
        sent = slice_rank(task.initial_state, rank)
        delta, result = load_task(cfg).local_update(sent, partition_id=pid, round_=1)
        assert state_rank(delta) == rank and delta.keys() == sent.keys()
        assert all(delta[k].shape == v.shape for k, v in sent.items())
        assert result.num_steps == 2
    assert backbone.BUILD_COUNT["n"] == builds + 1
    same = task.model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert same is base_weight and sorted(task.model.peft_config) == ["default", "rank2", "rank4"]
    adapters.set_adapter_state(task.model, task.initial_state)  # back to the server's rank
    assert state_rank(adapters.get_adapter_state(task.model)) == 8


def test_a_rank_2_adapter_computes_what_the_rank_8_adapter_cut_to_two_slices_computes(fresh_task):
    task = fresh_task(tiny_config())
    rng = np.random.default_rng(1)
    full = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in task.initial_state.items()}
    cut = {
        k: (v * (np.arange(8) < 2)[:, None] if ".lora_A." in k else v * (np.arange(8) < 2) if ".lora_B." in k else v)
        for k, v in full.items()
    }
    adapters.set_adapter_state(task.model, cut)
    expected = _logits(task)
    adapters.set_adapter_state(task.model, slice_rank(full, 2))
    torch.testing.assert_close(_logits(task), expected, rtol=0, atol=1e-5)


def test_a_rank_list_is_assigned_round_robin_and_memory_budgets_pick_the_largest_rank_that_fits():
    assert candidate_ranks(8) == [1, 2, 4, 8] and candidate_ranks(6) == [1, 2, 4, 6]
    cfg = tiny_config(**{"clients.rank-profile": "2,8", "strategy.name": "hetlora"})
    assert client_ranks(cfg) == [2, 8, 2]
    assert client_ranks(tiny_config()) == [8, 8, 8]
    task = load_task(tiny_config())
    needs = {r: task.training_bytes(r) for r in (1, 2, 4, 8)}
    assert needs[1] < needs[2] < needs[4] < needs[8]
    # AdamW: parameter, gradient and two moments per trainable scalar.
    assert needs[8] - task.weight_bytes.total_bytes == adapters.num_trainable(task.model) * 16
    budgets = [needs[2] / 1e6, needs[8] / 1e6 + 1, (needs[4] + needs[8]) / 2e6]
    cfg = tiny_config(**{"clients.rank-profile": "mem:" + ",".join(f"{b:.6f}" for b in budgets), **HET})
    assert client_ranks(cfg, task.training_bytes) == [2, 8, 4]
    poor = tiny_config(**{"clients.rank-profile": f"mem:{needs[1] / 1e6 - 0.01:.6f},100,100", **HET})
    with pytest.raises(ConfigError, match="partition 0 .* fits no LoRA rank.*raise that budget"):
        client_ranks(poor, task.training_bytes)
    assert state_rank(adapters.get_adapter_state(task.model)) == 8  # measuring left the active adapter alone
    shipped = load_config(ROOT / "simulations/configs/hetlora_zeropad_mem.toml")  # its comment promises these tiers
    assert client_ranks(shipped, task.training_bytes) == [2, 2, 2, 4, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"peft.lora-variant": "ffa", "peft.method": "ia3"}, "FFA-LoRA freezes LoRA's A matrix.*set peft.method=lora"),
        ({"clients.rank-profile": "2,0", **HET}, "ranks > 0"),
        ({"clients.rank-profile": "2,4,8,2", **HET}, "at most partition.num-partitions=3 ranks"),
        ({"clients.rank-profile": "2,16", **HET}, r"set peft.lora-rank=16"),
        ({"clients.rank-profile": "mem:60,80", **HET}, "exactly partition.num-partitions=3 budgets"),
        ({"clients.rank-profile": "two", **HET}, 'like "2,4,8"'),
        ({"clients.rank-profile": "2,4", "peft.lora-variant": "ffa", **HET}, "use one rank"),
        ({"clients.rank-profile": "2,4"}, "'hetlora' .* or 'flexlora' .* when clients.rank-profile"),
        ({"strategy.name": "flexlora", "peft.lora-variant": "ffa"}, "FlexLoRA re-factors B A"),
        (
            {**HET, "dp.mode": "client", "strategy.weighting": "uniform"},
            "'dp.mode' must be 'none' or 'sample' with strategy.name='hetlora'",
        ),
        (
            {"clients.rank-profile": "2,4", **HET, "peft.method": "ia3"},
            "hetlora aggregates LoRA factors .*set peft.method=lora",
        ),
    ],
)
def test_bad_rank_settings_are_errors_that_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)
