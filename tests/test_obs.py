"""obert.core.obs against float64 references built from explicit inverses and brute force."""

import itertools

import pytest
import torch
from conftest import reference_inverse

from obert.core.obs import (StreamingFisher, fisher_inverse_blocks, gram_blocks, prune_update,
                       quadratic_cost, saliency, woodbury_fisher_inverse)

CASES = [(8, 20, 5), (64, 60, 10), (3, 40, 8), (100, 48, 16), (17, 100, 50)]  # (m, d, B)


def fisher_blocks(grads, block_size, damp):
    return torch.linalg.inv(reference_inverse(grads, block_size, damp))


@pytest.mark.parametrize("m,d,B", CASES)
def test_fisher_inverse_matches_explicit_inverse(m, d, B):
    torch.manual_seed(m * d + B)
    grads = torch.randn(m, d, dtype=torch.float64)
    ref = reference_inverse(grads, B, 1e-2)
    got = fisher_inverse_blocks(grads, B, 1e-2)
    assert got.shape == (d // B, B, B)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_fisher_inverse_float32_close_to_float64():
    torch.manual_seed(1)
    grads = torch.randn(64, 200, dtype=torch.float64) * 1e-3
    ref = reference_inverse(grads, 50, 1e-5)
    got = fisher_inverse_blocks(grads.float(), 50, 1e-5)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-3


def test_fisher_inverse_rejects_bad_block_size():
    from obert.errors import ObertError

    with pytest.raises(ObertError, match="not divisible by the Fisher block size"):
        fisher_inverse_blocks(torch.randn(4, 10), 3, 1e-3)


@pytest.mark.parametrize("m,d,B", CASES)
def test_streaming_equals_batched(m, d, B):
    torch.manual_seed(7 + m)
    grads = torch.randn(m, d, dtype=torch.float64)
    batched = fisher_inverse_blocks(grads, B, 1e-2)
    stream = StreamingFisher(d, B, 1e-2, dtype=torch.float64)
    for chunk in torch.split(grads, 3):  # uneven chunks, the last one shorter
        stream.update(chunk)
    torch.testing.assert_close(stream.inverse(), batched, rtol=1e-9, atol=1e-9)
    wood = woodbury_fisher_inverse(grads, B, 1e-2)
    torch.testing.assert_close(wood, batched, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("group_size", [1, 2, 4, 5])
def test_saliency_matches_formula(group_size):
    torch.manual_seed(group_size)
    B, d = 20, 60
    grads = torch.randn(32, d, dtype=torch.float64)
    finv = reference_inverse(grads, B, 1e-1)
    w = torch.randn(d, dtype=torch.float64)
    got = saliency(w, finv, group_size)
    ref = []
    for q in range(d // group_size):
        b, off = divmod(q * group_size, B)
        sub = finv[b, off:off + group_size, off:off + group_size]
        wq = w[q * group_size:(q + 1) * group_size]
        ref.append(0.5 * wq @ torch.inverse(sub) @ wq)
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-10, atol=1e-12)
    if group_size == 1:
        diag = torch.cat([torch.diagonal(f) for f in finv])
        torch.testing.assert_close(got, w**2 / (2 * diag))


def brute_force_optimum(w, fisher, pruned):
    """min 1/2 dw^T F dw s.t. (w + dw)_P = 0, by eliminating dw_P = -w_P and solving for dw_U."""
    dw = torch.zeros_like(w)
    P = pruned.nonzero().squeeze(1)
    U = (~pruned).nonzero().squeeze(1)
    dw[P] = -w[P]
    if len(U):
        dw[U] = -torch.linalg.solve(fisher[U][:, U], fisher[U][:, P] @ dw[P])
    return dw


@pytest.mark.parametrize("seed", range(4))
def test_joint_update_is_the_brute_force_optimum(seed):
    torch.manual_seed(seed)
    m, d, B = 40, 60, 12
    grads = torch.randn(m, d, dtype=torch.float64)
    finv = reference_inverse(grads, B, 1e-2)
    fisher = torch.linalg.inv(finv)
    w = torch.randn(d, dtype=torch.float64)
    pruned = torch.rand(d) < 0.5
    pruned[:B] = False  # a block with nothing pruned stays untouched
    pruned[B:2 * B] = True  # a fully pruned block
    new = prune_update(w, finv, pruned)
    assert torch.all(new[pruned] == 0)
    torch.testing.assert_close(new[:B], w[:B])
    expected = w.clone()
    for b in range(d // B):
        sl = slice(b * B, (b + 1) * B)
        expected[sl] = w[sl] + brute_force_optimum(w[sl], fisher[b], pruned[sl])
    torch.testing.assert_close(new, expected, rtol=1e-8, atol=1e-10)
    # Its cost equals the closed form 1/2 w_P^T (F^-1_PP)^-1 w_P, and beats random feasible moves.
    cost = quadratic_cost(new - w, fisher)
    closed = 0.0
    for b in range(d // B):
        P = pruned[b * B:(b + 1) * B].nonzero().squeeze(1)
        wp = w[b * B:(b + 1) * B][P]
        closed += 0.5 * wp @ torch.linalg.solve(finv[b][P][:, P], wp) if len(P) else 0.0
    torch.testing.assert_close(cost, torch.as_tensor(closed, dtype=torch.float64))
    for _ in range(5):
        other = new + torch.randn(d, dtype=torch.float64) * 0.01 * (~pruned)
        assert quadratic_cost(other - w, fisher) > cost


def test_single_weight_update_matches_obs_formula():
    torch.manual_seed(3)
    B = 10
    finv = reference_inverse(torch.randn(30, B, dtype=torch.float64), B, 1e-2)
    w = torch.randn(B, dtype=torch.float64)
    q = 4
    pruned = torch.zeros(B, dtype=torch.bool)
    pruned[q] = True
    expected = w - finv[0][:, q] * w[q] / finv[0][q, q]
    expected[q] = 0
    for joint in (True, False):
        torch.testing.assert_close(prune_update(w, finv, pruned, joint=joint), expected)


@pytest.mark.parametrize("group_size", [1, 4])
def test_independent_update_is_sum_of_single_group_updates(group_size):
    torch.manual_seed(11)
    B, d = 16, 48
    finv = reference_inverse(torch.randn(50, d, dtype=torch.float64), B, 1e-2)
    w = torch.randn(d, dtype=torch.float64)
    groups = torch.rand(d // group_size) < 0.4
    pruned = groups.repeat_interleave(group_size)
    got = prune_update(w, finv, pruned, joint=False, group_size=group_size)
    expected = w.clone()
    for q in groups.nonzero().squeeze(1).tolist():
        b, off = divmod(q * group_size, B)
        Q = list(range(off, off + group_size))
        delta = finv[b][:, Q] @ torch.linalg.solve(finv[b][Q][:, Q], w[b * B + off:b * B + off + group_size])
        expected[b * B:(b + 1) * B] -= delta
    expected[pruned] = 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_joint_beats_independent_in_quadratic_cost():
    torch.manual_seed(5)
    B, d = 20, 100
    grads = torch.randn(60, d, dtype=torch.float64)
    finv = reference_inverse(grads, B, 1e-3)
    fisher = torch.linalg.inv(finv)
    w = torch.randn(d, dtype=torch.float64)
    pruned = torch.rand(d) < 0.6
    joint = quadratic_cost(prune_update(w, finv, pruned) - w, fisher)
    indep = quadratic_cost(prune_update(w, finv, pruned, joint=False) - w, fisher)
    assert joint < indep


def test_float32_update_close_to_float64():
    torch.manual_seed(9)
    B, d = 50, 500
    grads = torch.randn(128, d, dtype=torch.float64) * 1e-3
    w = torch.randn(d, dtype=torch.float64) * 0.05
    pruned = torch.rand(d) < 0.5
    ref = prune_update(w, fisher_inverse_blocks(grads, B, 1e-6), pruned)
    got = prune_update(w.float(), fisher_inverse_blocks(grads.float(), B, 1e-6), pruned)
    assert torch.all(got[pruned] == 0)
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-3


def test_functions_take_any_weight_shape():
    torch.manual_seed(2)
    w = torch.randn(6, 8, dtype=torch.float64)
    finv = reference_inverse(torch.randn(10, 48, dtype=torch.float64), 16, 1e-2)
    assert saliency(w, finv, 4).shape == (12,)
    pruned = torch.zeros(6, 8, dtype=torch.bool)
    pruned[0, :4] = True
    new = prune_update(w, finv, pruned)
    assert new.shape == w.shape and torch.all(new[0, :4] == 0)


def test_all_combinations_of_small_pruned_sets_are_optimal():
    """Exhaustive check on one tiny block: every pruned set gives the brute-force optimum."""
    torch.manual_seed(4)
    B = 5
    finv = reference_inverse(torch.randn(7, B, dtype=torch.float64), B, 1e-1)
    fisher = torch.linalg.inv(finv[0])
    w = torch.randn(B, dtype=torch.float64)
    for r in range(1, B + 1):
        for P in itertools.combinations(range(B), r):
            pruned = torch.zeros(B, dtype=torch.bool)
            pruned[list(P)] = True
            torch.testing.assert_close(prune_update(w, finv, pruned),
                                       w + brute_force_optimum(w, fisher, pruned))


def test_badly_conditioned_float32_blocks_fall_back_to_float64():
    """A rank-2 Fisher at damp 1e-6 and gradient scale 1e3 breaks float32 Cholesky (cond ~1e12)."""
    torch.manual_seed(0)
    good = torch.randn(2, 8, dtype=torch.float64) * 1e-2
    bad = torch.randn(2, 8, dtype=torch.float64) * 1e3
    grads = torch.cat([good, bad], dim=1)  # block 0 is benign, block 1 is not
    f32 = (bad.T @ bad / 2).float()
    f32.diagonal().add_(1e-6)
    assert int(torch.linalg.cholesky_ex(f32.unsqueeze(0))[1]) != 0  # the premise
    got = fisher_inverse_blocks(grads.float(), 8, 1e-6)
    assert torch.isfinite(got).all()
    ref = reference_inverse(grads, 8, 1e-6)
    # Block 0 takes the float32 Cholesky path: accurate to float32's normwise bound, about
    # cond(F) * eps = 773 * 6e-8 = 4.6e-5 (entries of ~1e6 beside ones of ~1e3, so an elementwise
    # tolerance would depend on the BLAS's rounding: 1.2e-3 on a small entry on Zen 4, 1.3e-5 normwise).
    assert float((got[0].double() - ref[0]).norm() / ref[0].norm()) < 1e-4
    # The bad block: float32 cannot hold this inverse accurately at all (cond ~1e12); obert
    # returns the float64 inverse of the rounded Fisher with its spectrum clamped at damp.
    f_rounded = gram_blocks(grads.float(), 8)[1] / 2  # the float32 Fisher obert computes
    f_rounded.diagonal().add_(1e-6)
    evals, evecs = torch.linalg.eigh(f_rounded.double())
    expected = evecs @ torch.diag(1 / evals.clamp(min=1e-6)) @ evecs.T
    assert float((got[1].double() - expected).norm() / expected.norm()) < 1e-5
    torch.testing.assert_close(got[1], got[1].T)


def test_one_damping_for_fisher_blocks_and_layer_hessians():
    """add_damping: absolute (lambda I) for a batch of Fisher blocks, relative to each matrix's
    mean diagonal for Hessians; against explicit float64 sums."""
    from obert.core.obs import add_damping

    torch.manual_seed(0)
    a = torch.randn(3, 5, 5, dtype=torch.float64)
    m = a @ a.transpose(1, 2)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(add_damping(m.clone(), 1e-3), m + 1e-3 * eye)
    expected = m + 0.01 * torch.stack([torch.diagonal(x).mean() for x in m])[:, None, None] * eye
    torch.testing.assert_close(add_damping(m.clone(), 0.01, relative=True), expected)
