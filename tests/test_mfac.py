"""M-FAC (static and dynamic) against explicit float64 inverses of the damped empirical Fisher."""

import pytest
import torch
from conftest import reference_inverse

from obert.core.mfac import MFAC, SlidingFisher
from obert.errors import ObertError

CASES = [(1, 7, 1e-2), (4, 30, 1e-3), (16, 16, 1e-1), (40, 25, 1e-4), (64, 200, 1e-6)]  # (m, d, damp)


def explicit(grads, damp):
    """``(damp I + G^T G / m)^-1`` by an explicit float64 inverse."""
    return reference_inverse(grads, grads.shape[1], damp)[0]


@pytest.mark.parametrize("m,d,damp", CASES)
def test_static_matches_explicit_inverse(m, d, damp):
    torch.manual_seed(m + d)
    grads = torch.randn(m, d, dtype=torch.float64)
    ref = explicit(grads, damp)
    f = MFAC(grads, damp)
    scale = ref.abs().max()
    x = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(f.ihvp(x), ref @ x, rtol=1e-9, atol=1e-9 * scale * x.abs().sum())
    xs = torch.randn(d, 3, dtype=torch.float64)
    torch.testing.assert_close(f.ihvp(xs), ref @ xs, rtol=1e-9, atol=1e-9 * scale * xs.abs().sum())
    torch.testing.assert_close(f.diag(), ref.diagonal(), rtol=1e-9, atol=1e-9 * scale)
    rows, cols = torch.randint(0, d, (50,)), torch.randint(0, d, (50,))
    torch.testing.assert_close(f.entries(rows, cols), ref[rows, cols], rtol=1e-9, atol=1e-9 * scale)
    idx = torch.randperm(d)[: 3 * (d // 3)].reshape(-1, 3)
    sub = f.submatrix(idx)
    for k in range(idx.shape[0]):
        torch.testing.assert_close(sub[k], ref[idx[k]][:, idx[k]], rtol=1e-9, atol=1e-9 * scale)


def test_group_blocks_and_stored_factor():
    """``group_blocks(g)``: the g x g diagonal sub-blocks of consecutive groups (batched over
    Fisher blocks); ``from_factor`` rebuilds the same object from a stored ``V``."""
    torch.manual_seed(3)
    grads = torch.randn(2, 9, 12, dtype=torch.float64)
    f = MFAC(grads, 1e-2)
    got = f.group_blocks(4)
    assert got.shape == (2, 3, 4, 4)
    for b in range(2):
        ref = explicit(grads[b], 1e-2)
        for q in range(3):
            torch.testing.assert_close(got[b, q], ref[4 * q:4 * q + 4, 4 * q:4 * q + 4], rtol=1e-9, atol=1e-9)
    again = MFAC.from_factor(f.v, 1e-2)
    x = torch.randn(2, 12, dtype=torch.float64)
    assert torch.equal(again.ihvp(x), f.ihvp(x)) and torch.equal(again.diag(), f.diag())
    with pytest.raises(ObertError, match="group size 5"):
        f.group_blocks(5)


def test_static_blocks_equal_one_mfac_per_block():
    """A batch ``[nb, m, B]`` is nb independent Fishers: the same as nb separate objects."""
    torch.manual_seed(0)
    grads = torch.randn(3, 12, 20, dtype=torch.float64)
    batched = MFAC(grads, 1e-3)
    x = torch.randn(3, 20, dtype=torch.float64)
    for b in range(3):
        one = MFAC(grads[b], 1e-3)
        torch.testing.assert_close(batched.ihvp(x)[b], one.ihvp(x[b]), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(batched.diag()[b], explicit(grads[b], 1e-3).diagonal(),
                                   rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("m,d,damp", [(8, 20, 1e-2), (30, 50, 1e-4), (100, 40, 1e-6)])
def test_joint_prune_update_is_the_constrained_optimum(m, d, damp):
    """``(F^-1_PP)^-1 w_P`` through the m x m Woodbury system equals the explicit solve, and the
    update is the explicit OBS formula (pruned entries exactly 0)."""
    torch.manual_seed(m * d)
    grads = torch.randn(m, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64)
    pruned = torch.rand(d) < 0.6
    ref = explicit(grads, damp)
    p = pruned.nonzero().squeeze(1)
    z = torch.zeros(d, dtype=torch.float64)
    z[p] = torch.linalg.solve(ref[p][:, p], w[p])
    f = MFAC(grads, damp)
    scale = z.abs().max()
    torch.testing.assert_close(f.solve_principal(pruned, w), z, rtol=1e-7, atol=1e-7 * scale)
    expect = w - ref @ z
    expect[p] = 0
    got = f.prune_update(w, pruned)
    assert bool((got[p] == 0).all())
    torch.testing.assert_close(got, expect, rtol=1e-7, atol=1e-7 * w.abs().max())


def test_float32_close_to_float64():
    torch.manual_seed(2)
    grads = torch.randn(64, 500, dtype=torch.float64) * 1e-3
    ref = MFAC(grads, 1e-7)
    got = MFAC(grads.float(), 1e-7)
    assert got.diag().dtype == torch.float32
    rel = (got.diag().double() - ref.diag()).abs() / ref.diag().abs()
    assert float(rel.max()) < 1e-2


@pytest.mark.parametrize("m,d,damp", [(1, 9, 1e-2), (5, 30, 1e-3), (12, 40, 1e-5)])
def test_sliding_window_matches_explicit_inverse_of_the_last_m(m, d, damp):
    """After every added gradient, ``F^-1 x`` equals the explicit inverse of the damped Fisher of
    the last m gradients (zeros for the slots not yet filled; normalised by m throughout)."""
    torch.manual_seed(m + d)
    window = SlidingFisher(d, m, damp, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(window.ihvp(x), x / damp)
    history = []
    for _ in range(3 * m + 2):
        g = torch.randn(d, dtype=torch.float64)
        window.add(g)
        history.append(g)
        last = torch.stack(history[-m:])
        padded = torch.cat([last, torch.zeros(m - last.shape[0], d, dtype=torch.float64)])
        ref = explicit(padded, damp)
        expect = ref @ x
        torch.testing.assert_close(window.ihvp(x), expect, rtol=1e-9, atol=1e-9 * expect.abs().max())
        torch.testing.assert_close(window.gram, window.grads @ window.grads.T, rtol=1e-12, atol=1e-9)


def test_sliding_window_state_round_trip():
    torch.manual_seed(0)
    a = SlidingFisher(10, 4, 1e-3, dtype=torch.float64)
    for _ in range(6):
        a.add(torch.randn(10, dtype=torch.float64))
    b = SlidingFisher(10, 4, 1e-3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    g = torch.randn(10, dtype=torch.float64)
    a.add(g)
    b.add(g)
    x = torch.randn(10, dtype=torch.float64)
    assert torch.equal(a.ihvp(x), b.ihvp(x))
    with pytest.raises(ObertError, match="window"):
        SlidingFisher(11, 4, 1e-3).load_state_dict(a.state_dict())


def test_bad_arguments():
    with pytest.raises(ObertError, match="damp"):
        MFAC(torch.randn(3, 4), 0.0)
    with pytest.raises(ObertError, match="grads"):
        MFAC(torch.randn(4), 1e-3)
    with pytest.raises(ObertError, match="window"):
        SlidingFisher(4, 0, 1e-3)
