"""M-FAC: the inverse of the damped empirical Fisher without forming it (Frantar, Kurtic, Alistarh,
NeurIPS 2021).

``F = damp * I + (1/m) G^T G`` for ``m`` gradients ``G`` (``[m, d]``). By the Woodbury identity

    ``F^-1 = (I - G^T (m damp I + G G^T)^-1 G) / damp = (I - V^T V) / damp``,
    ``V = L^-1 G``,  ``L L^T = m damp I + G G^T``  (Cholesky of an ``m x m`` matrix)

so after an ``O(d m^2)`` precomputation (the Gram matrix and one triangular solve) an
inverse-Hessian-vector product costs ``O(d m)``, one element ``[F^-1]_pq`` costs ``O(m)`` and
the whole diagonal ``O(d m)``. ``V``'s rows are the paper's vectors ``F_{i-1}^-1 g_i`` of its
rank-one recursion, scaled by ``sqrt(damp / (m + g_i^T F_{i-1}^-1 g_i))``: the Cholesky factor
does that recursion in one call.

The dynamic algorithm (``SlidingFisher``) keeps the last ``m`` gradients and ``G G^T``; swapping
a gradient costs ``O(d m + m^3)`` and a product ``F^-1 x`` ``O(d m + m^2)``.

Everything computes in the dtype of its inputs: exact in float64. The diagonal and the entries
subtract from ``1/damp`` and lose about ``eps / damp`` of absolute precision in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obert.errors import ObertError


def _check_damp(damp: float) -> None:
    if not damp > 0:
        raise ObertError(f"damp must be positive, got {damp}")


def _kernel_cholesky(gram: Tensor, num_grads: int, damp: float) -> Tensor:
    """Lower Cholesky factor of ``m damp I + G G^T`` (batched over leading dimensions)."""
    k = gram.clone()
    k.diagonal(dim1=-2, dim2=-1).add_(num_grads * damp)
    chol, info = torch.linalg.cholesky_ex(k)
    if bool((info != 0).any()):  # float32 rounding on near-duplicate gradients: redo in float64
        chol = torch.linalg.cholesky(k.double()).to(k.dtype)
    return chol


class MFAC:
    """The damped empirical Fisher ``F = damp I + (1/m) G^T G`` of ``grads`` ``[m, d]``, or of a
    batch of independent blocks ``[nb, m, B]`` (each block its own ``F``), through ``V``.

    ``ihvp(x)``: ``F^-1 x``; ``diag()``: the diagonal of ``F^-1``; ``entries(rows, cols)``:
    ``[F^-1]_{rows[k], cols[k]}``; ``submatrix(idx)``: ``F^-1[idx][:, idx]`` for index sets;
    ``solve_principal(idx_mask, x)``: ``(F^-1_PP)^-1 x_P`` through an ``m x m`` system.
    """

    def __init__(self, grads: Tensor, damp: float) -> None:
        _check_damp(damp)
        if grads.dim() not in (2, 3):
            raise ObertError(f"grads must be [m, d] or [blocks, m, d], got shape {tuple(grads.shape)}")
        self.damp = damp
        self.num_grads = grads.shape[-2]
        chol = _kernel_cholesky(grads @ grads.transpose(-2, -1), self.num_grads, damp)
        self.v = torch.linalg.solve_triangular(chol, grads, upper=False)  # [.., m, d]

    @classmethod
    def from_factor(cls, v: Tensor, damp: float) -> MFAC:
        """The object whose ``V`` is ``v`` (as computed earlier and stored), without the
        precomputation."""
        _check_damp(damp)
        self = cls.__new__(cls)
        self.damp, self.num_grads, self.v = damp, v.shape[-2], v
        return self

    def group_blocks(self, group_size: int) -> Tensor:
        """The ``g x g`` diagonal sub-blocks ``(F^-1)_QQ`` of consecutive groups of ``g`` entries:
        ``[.., d // g, g, g]``, ``O(m g^2)`` each (the curvature of a group saliency)."""
        *lead, m, d = self.v.shape
        if d % group_size:
            raise ObertError(f"group size {group_size} does not divide {d}")
        vg = self.v.reshape(*lead, m, d // group_size, group_size).movedim(-3, -1)  # [.., d/g, g, m]
        eye = torch.eye(group_size, dtype=vg.dtype, device=vg.device)
        return (eye - vg @ vg.transpose(-2, -1)) / self.damp

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^-1 x`` for ``x`` ``[.., d]`` (or ``[.., d, k]``, k vectors at once): ``O(d m)``."""
        vec = x.dim() == self.v.dim() - 1
        xs = x.unsqueeze(-1) if vec else x
        out = (xs - self.v.transpose(-2, -1) @ (self.v @ xs)) / self.damp
        return out.squeeze(-1) if vec else out

    def diag(self) -> Tensor:
        """``[F^-1]_qq = (1 - ||V[:, q]||^2) / damp`` for every q: ``[.., d]``."""
        return (1 - self.v.square().sum(-2)) / self.damp

    def entries(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``[F^-1]_{rows[k], cols[k]}``, ``O(m)`` each (unbatched ``F`` only)."""
        dot = (self.v[:, rows] * self.v[:, cols]).sum(0)
        return ((rows == cols).to(dot.dtype) - dot) / self.damp

    def submatrix(self, idx: Tensor) -> Tensor:
        """``F^-1[idx][:, idx]`` for index sets ``idx`` ``[n, g]`` (unbatched ``F``): ``[n, g, g]``,
        ``O(m g^2)`` each: the ``g x g`` diagonal sub-blocks of a group saliency."""
        vi = self.v[:, idx].permute(1, 2, 0)  # [n, g, m]
        eye = torch.eye(idx.shape[-1], dtype=vi.dtype, device=vi.device)
        return (eye - vi @ vi.transpose(-2, -1)) / self.damp

    def solve_principal(self, pruned: Tensor, x: Tensor) -> Tensor:
        """``z = (F^-1_PP)^-1 x_P`` scattered into ``d`` entries (0 off ``P``), for ``P`` the True
        entries of ``pruned`` (``[.., d]``, like ``x``).

        ``damp F^-1_PP = I - V_P^T V_P``, so by Woodbury
        ``(F^-1_PP)^-1 = damp (I + V_P^T (I_m - V_P V_P^T)^-1 V_P)``: an ``m x m`` solve however
        large ``P`` is (``I_m - V_P V_P^T`` is positive definite: ``F^-1_PP`` is).
        """
        p = pruned.to(self.v.dtype).unsqueeze(-2)  # [.., 1, d]
        vp = self.v * p  # V_P (columns off P zeroed)
        xp = (x * pruned).unsqueeze(-1)  # [.., d, 1]
        inner = -(vp @ vp.transpose(-2, -1))
        inner.diagonal(dim1=-2, dim2=-1).add_(1)
        chol, info = torch.linalg.cholesky_ex(inner)
        rhs = vp @ xp  # [.., m, 1]
        if bool((info != 0).any()):
            sol = torch.linalg.solve(inner.double(), rhs.double()).to(rhs.dtype)
        else:
            sol = torch.cholesky_solve(rhs, chol)
        z = xp + vp.transpose(-2, -1) @ sol
        return (self.damp * z).squeeze(-1)

    def prune_update(self, weights: Tensor, pruned: Tensor) -> Tensor:
        """The joint OBS update ``w - F^-1[:, P] (F^-1_PP)^-1 w_P``, then ``w_P = 0``: ``O(d m +
        |P| m^2 + m^3)`` (``weights``/``pruned`` ``[.., d]``)."""
        z = self.solve_principal(pruned, weights.to(self.v.dtype))
        return (weights - self.ihvp(z)).masked_fill(pruned, 0.0)


class SlidingFisher:
    """The dynamic algorithm: ``F = damp I + (1/m) G^T G`` over a window of the last ``m``
    gradients (``G`` starts as zeros, which add nothing: ``F = damp I`` before any gradient).

    ``add(g)`` replaces the oldest gradient: ``O(d m)`` for the new row of ``G G^T`` and ``O(m^3)``
    for its Cholesky factor; ``ihvp(x) = (x - G^T (m damp I + G G^T)^-1 G x) / damp`` costs
    ``O(d m + m^2)``. Memory: ``m d`` numbers in ``dtype``.
    """

    def __init__(self, d: int, num_grads: int, damp: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        _check_damp(damp)
        if num_grads <= 0:
            raise ObertError(f"the window must hold at least one gradient, got {num_grads}")
        self.damp = damp
        self.num_grads = num_grads
        self.grads = torch.zeros(num_grads, d, dtype=dtype, device=device)
        self.gram = torch.zeros(num_grads, num_grads, dtype=dtype, device=device)
        self.next = 0  # the slot the next gradient replaces
        self.seen = 0
        self._chol: Tensor | None = None

    def add(self, g: Tensor) -> None:
        """Put ``g`` (``[d]``) in the window in place of the oldest gradient."""
        i = self.next
        self.grads[i] = g.reshape(-1)
        row = self.grads @ self.grads[i]
        self.gram[i] = row
        self.gram[:, i] = row
        self.next = (i + 1) % self.num_grads
        self.seen += 1
        self._chol = None

    def ihvp(self, x: Tensor) -> Tensor:
        """``F^-1 x`` for ``x`` ``[d]``."""
        if self._chol is None:
            self._chol = _kernel_cholesky(self.gram, self.num_grads, self.damp)
        x = x.reshape(-1).to(self.grads.dtype)
        coef = torch.cholesky_solve((self.grads @ x).unsqueeze(-1), self._chol).squeeze(-1)
        return (x - coef @ self.grads) / self.damp

    def state_dict(self) -> dict:
        return {"grads": self.grads, "gram": self.gram, "next": self.next, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        if state["grads"].shape != self.grads.shape:
            raise ObertError(f"the saved M-FAC window is {tuple(state['grads'].shape)}, "
                             f"this one {tuple(self.grads.shape)}")
        self.grads.copy_(state["grads"])
        self.gram.copy_(state["gram"])
        self.next, self.seen = int(state["next"]), int(state["seen"])
        self._chol = None
