"""Unequal-rank LoRA math: zero padding (HetLoRA) and truncated-SVD redistribution (FlexLoRA)."""

import numpy as np
import pytest
from flwr.app import RecordDict

from fedpeft.comm import payload_bytes
from fedpeft.records import state_to_record
from strategies.lora_hetero import (
    flex_average,
    lora_pairs,
    pad_rank,
    slice_rank,
    split_svd,
    split_svd_of_product,
    state_rank,
    zero_pad_average,
)

A = "m.lora_A.default.weight"
B = "m.lora_B.default.weight"
HEAD = "classifier.modules_to_save.default.bias"


def _state(a, b, head) -> dict[str, np.ndarray]:
    return {A: np.array(a, np.float32), B: np.array(b, np.float32), HEAD: np.array(head, np.float32)}


def _random_state(rng, rank, out_dim=6, in_dim=5) -> dict[str, np.ndarray]:
    return {
        A: rng.standard_normal((rank, in_dim)).astype(np.float32),
        B: rng.standard_normal((out_dim, rank)).astype(np.float32),
        HEAD: rng.standard_normal(2).astype(np.float32),
    }


def test_lora_pairs_are_found_by_peft_key_names_and_an_unpaired_factor_is_an_error():
    assert lora_pairs([A, B, HEAD]) == {"m.default": (A, B)}
    with pytest.raises(ValueError, match="without their partner"):
        lora_pairs([B, HEAD])


def test_a_rank_2_clients_reply_fills_only_its_slice_of_the_max_rank_factors():
    delta = _random_state(np.random.default_rng(0), rank=2)
    padded = pad_rank(delta, 4)
    assert padded[A].shape == (4, 5) and padded[B].shape == (6, 4)
    np.testing.assert_array_equal(padded[A][:2], delta[A])
    np.testing.assert_array_equal(padded[B][:, :2], delta[B])
    assert not padded[A][2:].any() and not padded[B][:, 2:].any()
    alone = zero_pad_average([delta], [7.0], max_rank=4)
    np.testing.assert_array_equal(alone[A], padded[A])
    np.testing.assert_array_equal(alone[B], padded[B])


def test_zero_padding_averages_each_rank_slice_over_the_clients_that_have_it():
    # Client 1: rank 1, weight 1. Client 2: rank 2, weight 3.
    one = _state([[1, 2]], [[3], [4]], [1.0])
    two = _state([[5, 6], [7, 8]], [[1, 2], [3, 4]], [5.0])
    out = zero_pad_average([one, two], [1.0, 3.0], max_rank=3)
    # slice 0: 1/4 and 3/4; slice 1: client 2 alone; slice 2: nobody, stays 0; head: 1/4, 3/4.
    np.testing.assert_allclose(out[A], [[4, 5], [7, 8], [0, 0]])
    np.testing.assert_allclose(out[B], [[1.5, 2, 0], [3.25, 4, 0]])
    np.testing.assert_allclose(out[HEAD], [4.0])


def test_zero_padding_passes_each_slices_member_weights_to_the_coefficient_rule():
    one = _state([[1, 2]], [[3], [4]], [1.0])
    two = _state([[5, 6], [7, 8]], [[1, 2], [3, 4]], [5.0])
    over_n = lambda ws: [w / 4 for w in ws]  # noqa: E731  (FedAU-style: divide by N = 4, not by the sum)
    out = zero_pad_average([one, two], [1.0, 3.0], max_rank=2, coefficients=over_n)
    np.testing.assert_allclose(out[A], [[4, 5], [0.75 * 7, 0.75 * 8]])
    np.testing.assert_allclose(out[HEAD], [4.0])


def test_each_clients_downlink_has_its_ranks_shapes():
    global_state = _random_state(np.random.default_rng(1), rank=8, out_dim=12, in_dim=10)
    for rank in (2, 4, 8):
        sent = slice_rank(global_state, rank)
        assert sent[A].shape == (rank, 10) and sent[B].shape == (12, rank) and sent[HEAD].shape == (2,)
        assert state_rank(sent) == rank
        np.testing.assert_array_equal(sent[A], global_state[A][:rank])
    with pytest.raises(ValueError, match="cannot slice rank 9"):
        slice_rank(global_state, 9)


def test_a_clients_payload_bytes_are_its_factor_sizes_times_four():
    global_state = _random_state(np.random.default_rng(2), rank=8, out_dim=12, in_dim=10)
    for rank in (2, 4, 8):
        sent = RecordDict({"arrays": state_to_record(slice_rank(global_state, rank))})
        assert payload_bytes(sent) == (rank * 10 + 12 * rank + 2) * 4


def test_flexlora_at_full_rank_reconstructs_the_average_of_the_clients_products():
    rng = np.random.default_rng(3)
    current = _random_state(rng, rank=3, out_dim=4, in_dim=3)  # rank 3 = min(4, 3): full rank
    deltas = [_random_state(rng, rank=r, out_dim=4, in_dim=3) for r in (2, 3)]
    weights = [1.0, 3.0]
    new, stats = flex_average(current, deltas, weights, max_rank=3)
    products = []
    for d in deltas:
        r = d[A].shape[0]
        products.append((current[B][:, :r] + d[B]).astype(np.float64) @ (current[A][:r] + d[A]))
    mean = 0.25 * products[0] + 0.75 * products[1]
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A], mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(new[HEAD], current[HEAD] + 0.25 * deltas[0][HEAD] + 0.75 * deltas[1][HEAD], atol=1e-6)
    assert stats["flex-svd-matrices"] == 1.0 and stats["flex-svd-seconds"] >= 0.0
    assert stats["flex-energy-kept"] == pytest.approx(1.0)


def test_flexlora_truncated_factors_are_the_best_rank_r_approximation():
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((9, 7))
    s_ref = np.linalg.svd(matrix, compute_uv=False)
    for rank in (1, 2, 4):
        b, a, s = split_svd(matrix, rank)
        assert b.shape == (9, rank) and a.shape == (rank, 7)
        np.testing.assert_allclose(s, s_ref, rtol=1e-12)
        np.testing.assert_allclose(
            np.linalg.svd(b.astype(np.float64) @ a, compute_uv=False)[:rank], s_ref[:rank], rtol=1e-5
        )
        # Eckart-Young: the residual is exactly the dropped singular values.
        residual = np.linalg.norm(matrix - b.astype(np.float64) @ a) ** 2
        assert residual == pytest.approx(np.sum(s_ref[rank:] ** 2), rel=1e-5)
        # the split is symmetric: B^T B = A A^T = diag(S_r)
        np.testing.assert_allclose(b.T.astype(np.float64) @ b, np.diag(s_ref[:rank]), atol=1e-5)
        np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.diag(s_ref[:rank]), atol=1e-5)


def test_the_svd_from_stacked_factors_equals_the_svd_of_the_formed_product():
    rng = np.random.default_rng(7)
    left, right = rng.standard_normal((12, 5)), rng.standard_normal((5, 9))  # rank 5 < min(12, 9)
    b, a, s = split_svd_of_product(left, right, 3)
    b_ref, a_ref, s_ref = split_svd(left @ right, 3)
    np.testing.assert_allclose(s, s_ref[:5], rtol=1e-10)
    np.testing.assert_allclose(s_ref[5:], 0.0, atol=1e-10)
    np.testing.assert_allclose(b.astype(np.float64) @ a, b_ref.astype(np.float64) @ a_ref, atol=1e-5)
    b8, a8, _ = split_svd_of_product(left, right, 8)  # beyond the product's rank: zero slices
    assert b8.shape == (12, 8) and a8.shape == (8, 9) and not b8[:, 5:].any() and not a8[5:].any()


@pytest.mark.parametrize(
    ("out_dim", "in_dim", "ranks"),
    [(40, 30, (2, 4, 8)), (12, 9, (4, 8)), (6, 20, (2, 2, 4))],  # sum of ranks 14 < 30; 12 >= 9 and 8 >= 6: dense
)
def test_the_low_rank_route_equals_the_dense_svd_of_the_average_at_every_rank(out_dim, in_dim, ranks):
    rng = np.random.default_rng(8)
    weights = rng.uniform(0.5, 2.0, len(ranks))
    lefts = [w * rng.standard_normal((out_dim, r)) for w, r in zip(weights, ranks, strict=True)]
    rights = [rng.standard_normal((r, in_dim)) for r in ranks]
    average = sum(b_k @ a_k for b_k, a_k in zip(lefts, rights, strict=True))  # sum_k w_k B_k A_k, formed
    top = min(sum(ranks), out_dim, in_dim)
    b, a, s = split_svd_of_product(np.hstack(lefts), np.vstack(rights), top)
    b_ref, a_ref, s_ref = split_svd(average, top)
    assert s.size == top
    np.testing.assert_allclose(s, s_ref[:top], rtol=1e-10)
    np.testing.assert_allclose(s_ref[top:], 0.0, atol=1e-10 * s_ref[0])
    tol = 1e-5 * s_ref[0]  # fp32 factors
    for rank in range(1, top + 1):  # each truncation: the signs of U and V cancel in B_r A_r
        got = b[:, :rank].astype(np.float64) @ a[:rank]
        np.testing.assert_allclose(got, b_ref[:, :rank].astype(np.float64) @ a_ref[:rank], rtol=0, atol=tol)
    # the same symmetric split as the dense route: B^T B = A A^T = diag(S)
    np.testing.assert_allclose(b.T.astype(np.float64) @ b, np.diag(s_ref[:top]), rtol=0, atol=tol)
    np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.diag(s_ref[:top]), rtol=0, atol=tol)


def test_flexlora_sends_every_client_the_truncation_at_its_own_rank():
    rng = np.random.default_rng(5)
    current = _random_state(rng, rank=4, out_dim=8, in_dim=6)
    deltas = [_random_state(rng, rank=r, out_dim=8, in_dim=6) for r in (2, 4)]
    new, stats = flex_average(current, deltas, [1.0, 1.0], max_rank=4)
    target = 0.5 * sum(
        (current[B][:, : d[A].shape[0]] + d[B]).astype(np.float64) @ (current[A][: d[A].shape[0]] + d[A])
        for d in deltas
    )
    s_ref = np.linalg.svd(target, compute_uv=False)
    assert stats["flex-energy-kept"] == pytest.approx(np.sum(s_ref[:4] ** 2) / np.sum(s_ref**2), rel=1e-6)
    for rank in (2, 4):
        sent = slice_rank(new, rank)
        assert sent[A].shape == (rank, 6) and sent[B].shape == (8, rank)
        got = np.linalg.svd(sent[B].astype(np.float64) @ sent[A], compute_uv=False)[:rank]
        np.testing.assert_allclose(got, s_ref[:rank], rtol=1e-5)


def test_a_server_step_below_one_moves_the_product_part_of_the_way():
    rng = np.random.default_rng(6)
    current = _random_state(rng, rank=3, out_dim=4, in_dim=3)
    delta = _random_state(rng, rank=3, out_dim=4, in_dim=3)
    new, _ = flex_average(current, [delta], [1.0], max_rank=3, server_lr=0.5)
    old = current[B].astype(np.float64) @ current[A]
    client = (current[B] + delta[B]).astype(np.float64) @ (current[A] + delta[A])
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A], 0.5 * old + 0.5 * client, atol=1e-5)
