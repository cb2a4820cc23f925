"""Batched small-matrix operations of the block Fisher: Gram accumulation, and inverses and solves
of many symmetric positive definite ``n x n`` matrices.

On CPU float32 they run the native kernels (``obert.native``: 16 matrices per vector register, so
every step of the factorisation is a full-width vector operation; LAPACK, behind
``torch.linalg``, takes one call per matrix, ~20 us for a 50 x 50 inverse). Elsewhere (CUDA,
float64, no compiler, or ``native=False``) the same contract is met with ``torch.linalg``.
Every function reads only the lower triangle of its input matrices, so Gram sums need only be
accumulated there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obert import native as _native


# Largest matrix the native inverse and solve take: their 16 matrices in flight need 32 n^2
# bytes, beyond L2 above this, while LAPACK's blocked factorisation is efficient on big matrices.
NATIVE_MAX_N = 256


def _ext(*tensors: Tensor, native: bool = True, n: int = 0):
    """The extension when these tensors (matrices ``n x n``) can go to the native kernels, else None."""
    if not native or n > NATIVE_MAX_N or any(t.device.type != "cpu" or t.dtype != torch.float32
                                             for t in tensors):
        return None
    return _native.load()


def accumulate_gram_lower(gram: Tensor, grads: Tensor, *, native: bool = True) -> None:
    """``gram[b] += G_b^T G_b`` on (at least) the lower triangle, for ``gram`` ``[nb, B, B]`` and
    ``grads`` ``[k, nb * B]`` (block ``b`` = columns ``b*B .. b*B+B-1``). The native kernel
    leaves the strict upper triangle as it was (half the work); the PyTorch path adds the full
    product. ``symmetrize_lower_`` makes the full matrix where one is needed."""
    nb, bsz, _ = gram.shape
    ext = _ext(gram, grads, native=native)
    if ext is not None and gram.is_contiguous():
        ext.gram_lower(grads, gram, _native.isa_index())
        return
    g = grads.to(gram.dtype).reshape(grads.shape[0], nb, bsz).transpose(0, 1)
    gram.baddbmm_(g.transpose(1, 2), g)


def symmetrize_lower_(a: Tensor, chunk: int = 4096) -> Tensor:
    """Copies the lower triangle of every ``[..., n, n]`` matrix onto its upper one, in place
    (in chunks: these batches are the largest tensors obert holds)."""
    flat = a.reshape(-1, *a.shape[-2:])
    for s in range(0, flat.shape[0], chunk):
        c = flat[s:s + chunk]
        c.copy_(c.tril() + c.tril(-1).transpose(-2, -1))
    return a


def spd_inverse_(a: Tensor, scale: float = 1.0, shift: Tensor | None = None, *,
                 native: bool = True) -> Tensor:
    """``a[b] <- (scale * a[b] + shift[b] * I)^-1`` in place for a batch ``[N, n, n]`` of
    symmetric positive definite matrices (lower triangles read, full inverses written; Cholesky
    ``L L^T``, inverse ``L^-T L^-1``). Returns ``info`` ``[N]`` int32: 0, or the first column
    (+1) whose pivot was not positive, as LAPACK reports it; such a matrix is left unchanged."""
    ext = _ext(a, native=native, n=a.shape[-1])
    if shift is not None:
        shift = shift.to(device=a.device, dtype=a.dtype).contiguous()
    if ext is not None and a.is_contiguous():
        return ext.spd_inverse(a, float(scale), shift, _native.isa_index())
    m = a * scale
    if shift is not None:
        m.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    chol, info = torch.linalg.cholesky_ex(m)
    good = info == 0
    if bool(good.all()):
        a.copy_(torch.cholesky_inverse(chol))
    elif bool(good.any()):
        a[good] = torch.cholesky_inverse(chol[good])
    return info.to(torch.int32)


def masked_system(a: Tensor, p: Tensor) -> Tensor:
    """``p_i p_k a_ik + [i = k] (1 - p_i)`` for ``a`` ``[..., n, n]`` and a 0/1 mask ``p``
    ``[..., n]``: ``a_PP`` on the masked set, the identity elsewhere (a new tensor)."""
    p = p.to(a.dtype)
    s = a * p.unsqueeze(-1) * p.unsqueeze(-2)
    s.diagonal(dim1=-2, dim2=-1).add_(1 - p)
    return s


def spd_solve(a: Tensor, rhs: Tensor, mask: Tensor | None = None, *,
              native: bool = True) -> tuple[Tensor, Tensor]:
    """``x[b] = S_b^-1 rhs[b]`` for ``a`` ``[N, n, n]`` and ``rhs`` ``[N, n]``: ``S = a``, or with
    ``mask`` ``[N, n]`` (0/1) the masked system ``p_i p_k a_ik + [i = k] (1 - p_i)`` (``a_PP`` on
    the masked set, the identity elsewhere). Lower triangles read. Returns ``(x, info)`` with
    ``info`` as ``spd_inverse_``'s (that system's ``x`` is meaningless)."""
    pm = None if mask is None else mask.to(device=a.device, dtype=a.dtype)
    ext = _ext(a, native=native, n=a.shape[-1])
    if ext is not None and rhs.dtype == a.dtype:
        return tuple(ext.spd_solve(a.contiguous(), rhs.contiguous(),
                                   None if pm is None else pm.contiguous(), _native.isa_index()))
    s = a if pm is None else masked_system(a, pm)
    chol, info = torch.linalg.cholesky_ex(s)
    # Two triangular solves are several times faster than cholesky_solve on CPU batches.
    y = torch.linalg.solve_triangular(chol, rhs.to(a.dtype).unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(chol.transpose(-2, -1), y, upper=True).squeeze(-1)
    return x, info.to(torch.int32)
