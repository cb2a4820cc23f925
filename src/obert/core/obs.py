"""Optimal Brain Surgeon math on a block-diagonal empirical Fisher (the oBERT core).

Notation (one flattened weight tensor of ``d`` entries, split into ``d // B`` Fisher blocks of
``B`` consecutive weights; each block split into ``B // g`` groups of ``g`` consecutive weights):

* empirical Fisher of block b:  ``F_b = damp * I + (1/m) * G_b^T G_b``,  ``G_b = grads[:, bB:(b+1)B]``
* saliency of a group Q:        ``rho_Q = 1/2 * w_Q^T [(F^-1)_QQ]^-1 w_Q``
* OBS update, pruned set P:     ``w <- w - F^-1[:, P] (F^-1_PP)^-1 w_P``, then ``w_P = 0``

Every function is batched over blocks (no Python loop over blocks), works on CPU or CUDA, and
computes in the dtype of its inputs: exact in float64, fast in float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from obert.core.batched import accumulate_gram_lower, masked_system, spd_inverse_, spd_solve
from obert.errors import ObertError


def _check_blocks(d: int, block_size: int) -> int:
    if block_size <= 0 or d % block_size:
        raise ObertError(f"weight size {d} is not divisible by the Fisher block size {block_size}")
    return d // block_size


def gram_blocks(grads: Tensor, block_size: int) -> Tensor:
    """Per-block Gram matrices ``G_b^T G_b`` of ``grads`` ``[m, d]``: returns ``[d // B, B, B]``."""
    m, d = grads.shape
    nb = _check_blocks(d, block_size)
    g = grads.reshape(m, nb, block_size).transpose(0, 1)  # [nb, m, B]
    return torch.bmm(g.transpose(1, 2), g)


def add_damping(matrix: Tensor, damp: float, relative: bool = False) -> Tensor:
    """``M + lambda I`` in place, for one matrix or a batch ``[..., n, n]``: the damping of
    every curvature matrix obert inverts. ``lambda = damp`` (absolute: the Fisher blocks of
    pruning, where the paper's damping is a fixed 1e-7-1e-4), or ``damp * mean(diag M)`` per
    matrix (relative: the layer Hessians of OBS rounding, whose scale follows the activations)."""
    diag = matrix.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * diag.mean(-1, keepdim=True) if relative else damp)
    return matrix


def invert_fisher(gram: Tensor, num_grads: int, damp: float, *, native: bool = True) -> Tensor:
    """``(damp * I + gram / m)^-1`` for a batch of Gram blocks ``[nb, B, B]`` (batched Cholesky,
    ``core.batched.spd_inverse_``; only the lower triangle of ``gram`` is read).

    Works in place on ``gram``'s storage, since these batches are the largest tensors obert
    allocates.
    """
    if damp <= 0:
        raise ObertError("damp must be positive: the empirical Fisher of m < B gradients is singular")
    lam = torch.full(gram.shape[:1], damp, dtype=gram.dtype, device=gram.device)
    info = spd_inverse_(gram, 1.0 / num_grads, lam, native=native)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        # float32 rounding can leave a badly conditioned block indefinite (those blocks are left
        # as they were). Redo them in float64 through an eigendecomposition with eigenvalues
        # clamped at lambda: the inverse of the nearest matrix whose spectrum respects the damping.
        fisher = gram[bad].double() / num_grads
        floor = lam[bad].double().unsqueeze(-1)
        fisher.diagonal(dim1=-2, dim2=-1).add_(floor)
        evals, evecs = torch.linalg.eigh(fisher)  # reads the lower triangle, as the Cholesky does
        inv_bad = (evecs / torch.maximum(evals, floor).unsqueeze(-2)) @ evecs.transpose(-2, -1)
        gram[bad] = inv_bad.to(gram.dtype)
    return gram


def fisher_inverse_blocks(grads: Tensor, block_size: int, damp: float) -> Tensor:
    """Inverse of each diagonal block of the damped empirical Fisher.

    ``grads`` is ``[m, d]`` (m gradients of one flattened weight). Returns ``[d // B, B, B]``
    holding ``(damp * I + (1/m) G_b^T G_b)^-1`` for every block b.
    """
    return invert_fisher(gram_blocks(grads, block_size), grads.shape[0], damp)


class StreamingFisher:
    """Accumulates ``sum_i g_i g_i^T`` per block from gradients that arrive a few at a time.
    ``gram`` holds the sums on its lower triangle (the native kernel leaves the upper one zero;
    ``core.batched.symmetrize_lower_`` completes it): every consumer reads only that triangle.

    ``update(chunk)`` takes ``[k, d]`` (any k >= 1); ``inverse()`` equals
    ``fisher_inverse_blocks`` of all gradients stacked, without holding them all.
    Memory: ``d * B`` numbers in ``dtype``. ``summable``: partial sums from several processes add.
    """

    summable = True

    def __init__(self, d: int, block_size: int, damp: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.damp = damp
        self.num_grads = 0
        nb = _check_blocks(d, block_size)
        self.gram = torch.zeros(nb, block_size, block_size, dtype=dtype, device=device)

    def update(self, grads: Tensor) -> None:
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        accumulate_gram_lower(self.gram, grads.to(self.gram.dtype))
        self.num_grads += grads.shape[0]

    def inverse(self) -> Tensor:
        """The damped inverse blocks; consumes the accumulator (its storage is reused)."""
        if self.num_grads == 0:
            raise ObertError("no gradients were accumulated")
        return invert_fisher(self.gram, self.num_grads, self.damp)


class StreamingWoodbury:
    """The same inverse built by WoodFisher's recursion as gradients arrive (the number of
    gradients ``m`` must be known up front): ``F_0^-1 = I / damp`` and, for each gradient,

        ``F_i^-1 = F_{i-1}^-1 - (F_{i-1}^-1 g)(F_{i-1}^-1 g)^T / (m + g^T F_{i-1}^-1 g)``,

    applied ``k`` gradients ``G`` ``[k, B]`` at a time through the Woodbury identity, which is the
    same ``k`` rank-one steps in closed form:

        ``F^-1 <- F^-1 - F^-1 G^T (m I_k + G F^-1 G^T)^-1 G F^-1``

    (one batched ``k x k`` inverse per block instead of ``k`` matrix-vector products: the rank-one
    loop is bound by per-call overhead, ~25 s per gradient on MiniLM's 10.6M weights). Sequential
    in the gradients, so it cannot be summed across processes. Memory: ``d * B`` numbers in
    ``dtype``.
    """

    summable = False
    chunk = 16  # gradients per Woodbury step: fastest of 8/16/32/64 on MiniLM-sized layers

    def __init__(self, d: int, block_size: int, damp: float, num_grads: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if damp <= 0:
            raise ObertError("damp must be positive: the empirical Fisher of m < B gradients is singular")
        self.block_size = block_size
        self.expected = num_grads
        self.num_grads = 0
        nb = _check_blocks(d, block_size)
        self.finv = torch.eye(block_size, dtype=dtype, device=device).repeat(nb, 1, 1) / damp

    def update(self, grads: Tensor) -> None:
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        if self.num_grads + grads.shape[0] > self.expected:
            raise ObertError(f"more than the {self.expected} gradients announced")
        nb = self.finv.shape[0]
        shift = torch.full((nb,), float(self.expected), dtype=self.finv.dtype, device=self.finv.device)
        for rows in grads.to(self.finv.dtype).split(self.chunk):
            g = rows.reshape(rows.shape[0], nb, self.block_size).transpose(0, 1)  # [nb, k, B]
            fg = torch.bmm(self.finv, g.transpose(1, 2))  # F^-1 G^T  [nb, B, k]
            inner = torch.bmm(g, fg)  # G F^-1 G^T, then (m I + G F^-1 G^T)^-1 in place
            bad = (spd_inverse_(inner, 1.0, shift) != 0).nonzero().squeeze(1)
            if bad.numel():  # float32 rounding (these are left as they were): redo in float64
                sub = inner[bad].double()
                sub.diagonal(dim1=-2, dim2=-1).add_(float(self.expected))
                inner[bad] = torch.linalg.inv(sub).to(inner.dtype)
            self.finv.sub_(torch.bmm(fg, torch.bmm(inner, fg.transpose(1, 2))))
        self.num_grads += grads.shape[0]

    def inverse(self) -> Tensor:
        if self.num_grads != self.expected:
            raise ObertError(f"{self.num_grads} of the {self.expected} gradients announced arrived")
        return self.finv


def woodbury_fisher_inverse(grads: Tensor, block_size: int, damp: float) -> Tensor:
    """``fisher_inverse_blocks`` by m rank-one Sherman-Morrison updates (``StreamingWoodbury``).
    Slower than the Gram form (m sequential steps): the reference the paper used."""
    m, d = grads.shape
    acc = StreamingWoodbury(d, block_size, damp, m, dtype=grads.dtype, device=grads.device)
    acc.update(grads)
    return acc.inverse()


def group_diag_blocks(finv: Tensor, group_size: int) -> Tensor:
    """The ``g x g`` diagonal sub-blocks ``(F^-1)_QQ`` of each Fisher block: ``[nb, B//g, g, g]``."""
    nb, bsz, _ = finv.shape
    if group_size <= 0 or bsz % group_size:
        raise ObertError(f"group size {group_size} does not divide the Fisher block size {bsz}")
    ng = bsz // group_size
    idx = torch.arange(ng, device=finv.device)
    blocks = finv.reshape(nb, ng, group_size, ng, group_size)
    return blocks[:, idx, :, idx, :].transpose(0, 1)  # advanced indexing puts ng first


def saliency(weights: Tensor, finv: Tensor, group_size: int = 1) -> Tensor:
    """OBS saliency of each group of ``group_size`` consecutive weights.

    ``rho_Q = 1/2 * w_Q^T [(F^-1)_QQ]^-1 w_Q``; for group_size 1, ``w^2 / (2 [F^-1]_qq)``.
    ``weights`` has ``d`` entries (any shape, flattened in row-major order); ``finv`` is
    ``[d // B, B, B]``. Returns ``[d // group_size]``.
    """
    nb, bsz, _ = finv.shape
    w = weights.reshape(nb, bsz).to(finv.dtype)
    if group_size == 1:
        return (w.square() / (2 * finv.diagonal(dim1=-2, dim2=-1))).reshape(-1)
    diag = group_diag_blocks(finv, group_size)  # [nb, ng, g, g]
    wq = w.reshape(nb, bsz // group_size, group_size, 1)
    sol = _solve_spd(diag, wq.squeeze(-1)).unsqueeze(-1)  # [(F^-1)_QQ]^-1 w_Q
    return (0.5 * (wq * sol).sum(dim=(-2, -1))).reshape(-1)


def nm_patterns(m: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """Every way to prune ``k`` of ``m`` consecutive weights: ``[C(m, k), m]`` bool, True = pruned
    (lexicographic order of the pruned positions)."""
    rows = [[j in combo for j in range(m)] for combo in itertools.combinations(range(m), k)]
    return torch.tensor(rows, dtype=torch.bool, device=device).reshape(len(rows), m)


def pattern_saliency(weights: Tensor, group_finv: Tensor, patterns: Tensor,
                     chunk: int = 16384) -> Tensor:
    """OBS saliency of pruning each pattern inside each group of ``M`` consecutive weights:
    ``rho_P = 1/2 * w_P^T [(F^-1)_PP]^-1 w_P`` (N:M semi-structured pruning: every pattern of a
    group prunes the same number ``k`` of its ``M`` weights).

    ``weights`` ``[G, M]``, ``group_finv`` ``[G, M, M]`` (the ``M x M`` diagonal blocks of
    ``F^-1``), ``patterns`` ``[P, M]`` bool with ``k`` True per row. Returns ``[G, P]``; ``G`` is
    processed ``chunk`` groups at a time (``G P k^2`` numbers otherwise).
    """
    num, m = patterns.shape
    k = int(patterns[0].sum())
    if k == 0:
        return weights.new_zeros(weights.shape[0], num, dtype=group_finv.dtype)
    idx = patterns.nonzero()[:, 1].reshape(num, k).to(weights.device)  # pruned positions
    out = []
    for g0 in range(0, weights.shape[0], chunk):
        w = weights[g0:g0 + chunk].to(group_finv.dtype)
        f = group_finv[g0:g0 + chunk]
        sub = f[:, idx[:, :, None], idx[:, None, :]]  # [g, P, k, k]
        wp = w[:, idx]  # [g, P, k]
        sol = torch.linalg.solve(sub, wp.unsqueeze(-1)).squeeze(-1)
        out.append(0.5 * (wp * sol).sum(-1))
    return torch.cat(out)


def prune_update(weights: Tensor, finv: Tensor, prune_mask: Tensor, *, joint: bool = True,
                 group_size: int = 1) -> Tensor:
    """OBS weight update for pruning the entries where ``prune_mask`` is True.

    joint (default): inside each Fisher block with pruned set P,
        ``w <- w - F^-1[:, P] (F^-1_PP)^-1 w_P``
    the exact minimiser of ``dw^T F dw`` subject to ``w_P + dw_P = 0``.
    independent (the oBERT paper's multi-group rule): the sum of the single-group updates
        ``w <- w - sum_Q F^-1[:, Q] (F^-1_QQ)^-1 w_Q`` over pruned groups Q (``group_size`` each).
    Either way ``w_P`` is set to exactly 0. Returns a new tensor shaped like ``weights``.
    """
    nb, bsz, _ = finv.shape
    dtype = finv.dtype
    w = weights.reshape(nb, bsz).to(dtype)
    p = prune_mask.reshape(nb, bsz).to(dtype)
    wp = (w * p).unsqueeze(-1)  # [nb, B, 1]; only w_P enters the update
    if joint:
        # Solve the masked system diag(p) F^-1 diag(p) + diag(1 - p), which is F^-1_PP on P and the
        # identity elsewhere: the right-hand side is 0 off P, so z = (F^-1_PP)^-1 w_P on P, 0 off P.
        # Only blocks that prune something need a solve (indexing copies, so skip it if all do).
        active = p.any(dim=1)
        if bool(active.all()):
            z = _solve_spd(finv, wp.squeeze(-1), p).unsqueeze(-1)
        else:
            z = torch.zeros_like(wp)
            if bool(active.any()):
                z[active] = _solve_spd(finv[active], wp[active].squeeze(-1), p[active]).unsqueeze(-1)
    else:
        ng = bsz // group_size
        if group_size == 1:
            z = wp / finv.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        else:
            z = group_solve(group_diag_blocks(finv, group_size), wp.reshape(nb, ng, group_size),
                            p.reshape(nb, ng, group_size)).reshape(nb, bsz, 1)
        z = z * p.unsqueeze(-1)
    new = w - torch.bmm(finv, z).squeeze(-1)
    new = new.masked_fill(p.bool(), 0.0)
    return new.reshape(weights.shape).to(weights.dtype)


def group_solve(blocks: Tensor, w: Tensor, pruned: Tensor) -> Tensor:
    """``z_P = [(F^-1_QQ)_PP]^-1 w_P`` inside every group Q (0 off its pruned part P):
    ``blocks`` ``[.., g, g]`` are the groups' ``F^-1_QQ``, ``w`` and ``pruned`` ``[.., g]``. A
    whole group pruned (block4) solves with ``F^-1_QQ``; part of one (N:M) with its sub-block."""
    p = pruned.to(blocks.dtype)
    # The masked system: identity off P, where the right-hand side is 0.
    return _solve_spd(blocks, w.to(blocks.dtype) * p, p)


def _solve_spd(a: Tensor, b: Tensor, p: Tensor | None = None) -> Tensor:
    """``x = S^-1 b`` for a batch of SPD systems ``S = a`` ``[..., n, n]``, ``b`` ``[..., n]``,
    or with ``p`` the masked systems ``a_PP`` on ``p`` (identity elsewhere): batched Cholesky
    (``core.batched.spd_solve``); the systems whose factorisation fails are redone by float64 LU."""
    shape = b.shape
    n = a.shape[-1]
    a, b = a.reshape(-1, n, n), b.reshape(-1, n)
    p = None if p is None else p.reshape(-1, n)
    z, info = spd_solve(a, b, p)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        s = a[bad].double().tril()
        s = s + s.tril(-1).transpose(-2, -1)  # the lower triangle is what the Cholesky read
        if p is not None:
            s = masked_system(s, p[bad])
        z[bad] = torch.linalg.solve(s, b[bad].double().unsqueeze(-1)).squeeze(-1).to(z.dtype)
    return z.reshape(shape)


def quadratic_cost(delta: Tensor, fisher: Tensor) -> Tensor:
    """``1/2 * dw^T F dw`` summed over blocks, for ``delta`` of ``d`` entries and ``F`` ``[nb, B, B]``."""
    nb, bsz, _ = fisher.shape
    dw = delta.reshape(nb, bsz, 1).to(fisher.dtype)
    return 0.5 * (dw.transpose(1, 2) @ fisher @ dw).sum()
