"""The one-byte codec, the seeded perturbation, SPSA steps and the log's replay (no Flower)."""

import numpy as np
import pytest
import torch

from fedpeft import onebyte, zo
from fedpeft.zo_log import RoundLog, f32, pack_log, replay_round, unpack_log

SHAPES = {"lora_B": (3, 2), "head.weight": (2, 4), "lora_A": (2, 5)}


@pytest.mark.parametrize("codec, dtype", [("int8", np.int8), ("log8", np.uint8)])
def test_codes_are_one_byte_each_of_the_codec_dtype(codec, dtype):
    codes = onebyte.encode([0.1, -0.2, 0.0], 1.0, codec=codec, rng=np.random.default_rng(0))
    assert codes.dtype == dtype and codes.itemsize == 1
    assert len(onebyte.to_bytes(codes)) == 3
    np.testing.assert_array_equal(onebyte.from_bytes(onebyte.to_bytes(codes), codec), codes)


@pytest.mark.parametrize("codec", onebyte.CODECS)
def test_round_trip_error_stays_within_the_codec_bound(codec):
    g = np.random.default_rng(1).uniform(-2.0, 2.0, 5000)
    g[:5] = [0.0, 1e-9, -1e-9, 2.0, -2.0]
    decoded = onebyte.decode(onebyte.encode(g, 2.0, codec=codec, rng=np.random.default_rng(2)), 2.0, codec=codec)
    bound = onebyte.error_bound(g, 2.0, codec=codec)
    assert np.all(np.abs(decoded - g) <= bound * (1 + 1e-5))


def test_int8_codes_are_the_hand_computed_floor_of_127_g_over_s_plus_u():
    # s = 1: g = 0.5 -> 63.5; with u = 0.25 -> floor(63.75) = 63, with u = 0.75 -> 64.
    class FixedU:
        def __init__(self, u):
            self.u = u

        def random(self, shape):
            return np.full(shape, self.u)

    assert onebyte.encode(0.5, 1.0, rng=FixedU(0.25))[0] == 63
    assert onebyte.encode(0.5, 1.0, rng=FixedU(0.75))[0] == 64
    np.testing.assert_allclose(onebyte.decode(np.int8(64), 1.0), 64 / 127)


@pytest.mark.parametrize("codec", onebyte.CODECS)
def test_stochastic_rounding_is_unbiased_inside_the_range(codec):
    rng = np.random.default_rng(3)
    for g in (0.3, -0.0123, 0.777):
        decoded = onebyte.decode(onebyte.encode(np.full(40000, g), 1.0, codec=codec, rng=rng), 1.0, codec=codec)
        # standard error of the mean is below 0.4 * step / sqrt(40000) = 0.002 * step
        step = 1 / 127 if codec == "int8" else abs(g) * 0.133
        assert abs(decoded.mean() - g) < 0.01 * step


@pytest.mark.parametrize("codec", onebyte.CODECS)
def test_out_of_range_values_clip_to_the_scale(codec):
    rng = np.random.default_rng(4)
    decoded = onebyte.decode(onebyte.encode([5.0, -7.0, np.inf], 0.5, codec=codec, rng=rng), 0.5, codec=codec)
    np.testing.assert_array_equal(decoded, np.array([0.5, -0.5, 0.5], np.float32))


@pytest.mark.parametrize("codec", onebyte.CODECS)
def test_nan_never_encodes_and_the_zero_code_decodes_to_zero(codec):
    with pytest.raises(onebyte.NonFiniteGradient, match="NaN"):
        onebyte.encode([0.1, np.nan], 1.0, codec=codec, rng=np.random.default_rng(0))
    assert onebyte.decode(onebyte.zero_code(codec), 3.0, codec=codec)[0] == 0.0


def test_int8_code_minus_128_and_bad_scales_are_rejected():
    with pytest.raises(ValueError, match="-128"):
        onebyte.decode(np.array([-128], np.int8), 1.0)
    with pytest.raises(ValueError, match="scale"):
        onebyte.encode([0.1], 0.0, rng=np.random.default_rng(0))


def test_perturbation_from_a_seed_is_bit_identical_across_calls_and_dict_orders():
    a = zo.perturbation(123, SHAPES)
    b = zo.perturbation(123, dict(reversed(list(SHAPES.items()))))
    assert list(a) == sorted(SHAPES)
    for name in SHAPES:
        assert a[name].dtype == torch.float32 and tuple(a[name].shape) == SHAPES[name]
        assert torch.equal(a[name], b[name])
    assert not torch.equal(zo.perturbation(124, SHAPES)["lora_A"], a["lora_A"])
    rad = zo.perturbation(5, SHAPES, "rademacher")
    assert set(torch.cat([t.flatten() for t in rad.values()]).tolist()) <= {-1.0, 1.0}


def test_direction_seeds_differ_by_round_partition_and_step():
    seeds = {zo.direction_seed(0, r, p, k) for r in (1, 2) for p in (0, 1) for k in (0, 1)}
    assert len(seeds) == 8


def test_spsa_estimate_of_a_quadratic_matches_the_directional_derivative_and_restores_theta():
    # L(theta) = 0.5 * |theta|^2 => g = (L(t+ez) - L(t-ez)) / 2e = <t, z> exactly (up to rounding)
    master = zo.to_master({"w": np.array([1.0, -2.0, 0.5], np.float32)})
    params = {"w": master["w"].clone()}
    z = {"w": torch.tensor([0.5, 1.0, -2.0])}
    est = zo.spsa_estimate(lambda: 0.5 * (params["w"] ** 2).sum(), params, master, z, eps=1e-2)
    assert est.g == pytest.approx(1.0 * 0.5 - 2.0 * 1.0 - 0.5 * 2.0, rel=1e-4)  # -2.5
    assert torch.equal(params["w"], master["w"])


def _quadratic_client(codec="int8", steps=12):
    target = {n: torch.randn(s, generator=torch.Generator().manual_seed(7)) for n, s in SHAPES.items()}
    start = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    master = zo.to_master(start)
    params = {n: t.clone() for n, t in master.items()}

    def loss(_batch):
        return sum(((params[n] - target[n]) ** 2).sum() for n in params)

    result = zo.run_local_steps(
        params, master, [None], loss, run_seed=3, round_=2, partition_id=1, num_steps=steps,
        eps=1e-3, lr=0.02, scale=20.0, codec=codec,
    )  # fmt: skip
    return start, master, result, loss


@pytest.mark.parametrize("codec", onebyte.CODECS)
def test_replaying_a_clients_codes_reproduces_its_final_adapter_bit_for_bit(codec):
    start, client_final, result, _ = _quadratic_client(codec)
    server = zo.to_master(start)
    entry = RoundLog(2, f32(20.0), f32(0.02), f32(1.0), ((1, onebyte.to_bytes(result.codes)),))
    assert replay_round(server, entry, run_seed=3, codec=codec) == 12
    for name in SHAPES:
        assert torch.equal(server[name], client_final[name])
    assert zo.state_hash(server) == zo.state_hash(client_final)


def test_spsa_steps_lower_the_loss_of_a_quadratic():
    _, _, result, _ = _quadratic_client(steps=300)
    assert result.losses[-20:].mean() < 0.7 * result.losses[:20].mean()


def test_the_log_wire_format_round_trips_and_leaves_out_the_receivers_own_codes():
    rounds = [
        RoundLog(3, f32(0.5), f32(1e-3), f32(0.5), ((0, b"\x01\x02"), (2, b"\x7f\x80"))),
        RoundLog(4, f32(0.25), f32(1e-3), f32(1.0), ()),
    ]
    packed = pack_log(rounds, yours=2)
    # 2 round headers (18 B) + partition 0: 4 + 2 codes + partition 2: 4-byte marker only
    assert len(packed) == 2 * 18 + 6 + 4
    back = unpack_log(packed)
    assert back[0].entries == ((0, b"\x01\x02"), (2, None)) and back[1] == rounds[1]
    assert unpack_log(pack_log(rounds)) == rounds


def test_the_state_hash_ignores_dict_order_and_sees_one_bit():
    state = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    flipped = {"b": state["b"], "a": state["a"].copy()}
    assert zo.state_hash(state) == zo.state_hash(flipped) and len(zo.state_hash(state)) == 8
    flipped["a"][0] = np.nextafter(np.float32(1), np.float32(2))
    assert zo.state_hash(state) != zo.state_hash(flipped)


def test_inverse_sqrt_schedule_divides_by_the_square_root_of_the_round():
    assert zo.lr_at(0.1, "constant", 9) == 0.1
    assert zo.lr_at(0.1, "inverse-sqrt", 4) == pytest.approx(0.05)
