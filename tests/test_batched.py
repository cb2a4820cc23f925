"""The batched small-matrix kernels of the block Fisher (obert.core.batched) on every native
instruction-set path this CPU runs (the ``isa`` fixture) and on the PyTorch fallback, against
float64 references: explicit products, explicit inverses, explicit solves."""

from __future__ import annotations

import pytest
import torch

from obert.core.batched import accumulate_gram_lower, spd_inverse_, spd_solve, symmetrize_lower_
from obert.core.obs import invert_fisher

# (matrices, n): lane tails, odd n, and one beyond NATIVE_MAX_N (the LAPACK path under the same contract)
SHAPES = [(1, 1), (5, 4), (16, 7), (17, 50), (33, 32), (3, 97), (2, 260)]


def spd_batch(N: int, n: int, seed: int = 0) -> torch.Tensor:
    """Well-conditioned SPD matrices in float64 (a Gram of 2n random rows plus the identity)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, 2 * n, n, generator=g, dtype=torch.float64)
    return a.transpose(1, 2) @ a / (2 * n) + torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 13, 64])
def test_gram_lower_matches_float64_products(isa, native, rows):
    torch.manual_seed(rows)
    for N, n in SHAPES:
        wide = torch.randn(rows, N * n + 5)
        grads = wide[:, 2:2 + N * n]  # rows with a stride wider than the row: a view, not a copy
        start = torch.randn(N, n, n)
        gram = start.clone()
        accumulate_gram_lower(gram, grads, native=native)
        accumulate_gram_lower(gram, grads, native=native)  # it accumulates
        g = grads.double().reshape(rows, N, n).transpose(0, 1)
        ref = start.double() + 2 * g.transpose(1, 2) @ g
        torch.testing.assert_close(gram.double().tril(), ref.tril(), rtol=1e-5, atol=1e-4)
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        if native and isa != "none":  # the kernel does half the work: the upper triangle stays
            assert torch.equal(gram[:, upper], start[:, upper])
        else:
            torch.testing.assert_close(gram.double()[:, upper], ref[:, upper], rtol=1e-5, atol=1e-4)
        symmetrize_lower_(gram)
        torch.testing.assert_close(gram.double(), ref.tril() + ref.tril(-1).transpose(1, 2),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_spd_inverse_matches_explicit_inverse(isa, native):
    for N, n in SHAPES:
        a = spd_batch(N, n, seed=n)
        shift = torch.rand(N, dtype=torch.float64) + 0.1
        scale = 0.5
        m = a.float()
        m.triu_(1).mul_(-7).add_(a.float().tril())  # garbage above the diagonal: never read
        info = spd_inverse_(m, scale, shift.float(), native=native)
        assert info.dtype == torch.int32 and not info.any()
        ref = torch.linalg.inv(scale * a + torch.diag_embed(shift.unsqueeze(-1).expand(N, n)))
        assert float(((m.double() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max()) < 1e-5
        torch.testing.assert_close(m, m.transpose(1, 2))


@pytest.mark.parametrize("native", [True, False])
def test_spd_inverse_reports_failed_pivots_like_lapack_and_keeps_those_matrices(isa, native):
    N, n = 20, 6
    a = spd_batch(N, n).float()
    for b, col in ((3, 0), (16, 4), (19, 2)):  # a non-positive pivot at column `col`
        a[b, col, col] = -abs(float(a[b, col, col])) - 50.0
    a[7, 1, 1] = float("nan")
    expected_info = torch.linalg.cholesky_ex(a)[1]
    before = a.clone()
    info = spd_inverse_(a, native=native)
    assert torch.equal(info, expected_info.to(torch.int32))
    bad = info != 0
    assert bad.sum() == 4
    torch.testing.assert_close(a[bad], before[bad], equal_nan=True)  # left as they were
    ref = torch.linalg.inv(before[~bad].double())
    torch.testing.assert_close(a[~bad].double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_spd_solve_matches_explicit_solve(isa, native, masked):
    g = torch.Generator().manual_seed(1)
    for N, n in SHAPES:
        a = spd_batch(N, n, seed=n + 1)
        rhs = torch.randn(N, n, generator=g, dtype=torch.float64)
        p = (torch.rand(N, n, generator=g) < 0.6).double() if masked else None
        if masked:
            p[0] = 0.0  # a block that prunes nothing: the identity system
        x, info = spd_solve(a.float(), rhs.float(), None if p is None else p.float(), native=native)
        assert not info.any()
        s = a if p is None else a * p.unsqueeze(-1) * p.unsqueeze(-2) + torch.diag_embed(1 - p)
        ref = torch.linalg.solve(s, rhs.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(x.double(), ref, rtol=1e-4, atol=1e-5)


def test_native_and_torch_paths_agree_on_a_fisher_inverse(isa):
    """invert_fisher gives the same inverse on both paths."""
    torch.manual_seed(0)
    grads = torch.randn(40, 30 * 20)
    for damp in (1e-3, 1e-2):
        grams = []
        for native in (True, False):
            gram = torch.zeros(30, 20, 20)
            accumulate_gram_lower(gram, grads, native=native)
            grams.append(invert_fisher(gram, 40, damp, native=native))
        torch.testing.assert_close(grams[0], grams[1], rtol=1e-4, atol=1e-5)
