"""Optimal Brain Surgeon rounding of a Linear layer's weights to an int8 grid (GPTQ-style).

For a layer ``y = x W^T`` the error of replacing ``W`` by ``Q`` over calibration inputs ``X``
is ``sum_n (w_n - q_n)^T H (w_n - q_n)`` with ``H = X^T X`` (one Hessian shared by every output
row). Weights are fixed one input column ``j`` at a time, in a chosen order: each row's weight
goes to its grid point ``q = s_n clamp(round(w / s_n), -127, 127)`` (or to 0 where the sparsity
mask prunes it), and the OBS update moves the row's still-free weights ``F`` (the columns after
``j``) to absorb the error::

    w_F <- w_F - (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_Fj,    H_F = H restricted to {j} u F

``[H_F^-1]_Fj / [H_F^-1]_jj`` is row ``j`` of the upper Cholesky factor ``U`` of ``H^-1`` divided
by ``U_jj`` (``H^-1 = U^T U``), so one factorisation serves every step (Frantar et al., GPTQ;
SparseGPT for masked weights: a pruned weight is "rounded" to 0 and its error propagates too).
Round-to-nearest is the special case ``H = I``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from obert.core.obs import add_damping
from obert.errors import ObertError

INT8_MAX = 127


def row_scales(weight: Tensor) -> Tensor:
    """Per output row ``s_n = max_k |w_nk| / 127`` (at least 1e-12): the int8 grid of each row."""
    return (weight.abs().amax(1) / INT8_MAX).clamp(min=1e-12)


def round_to_grid(w: Tensor, scale: Tensor) -> Tensor:
    """Integer levels ``clamp(round(w / s), -127, 127)`` for columns ``w [N, c]`` and scales ``[N]``."""
    return (w / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX)


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """Per input channel ``s_j = max|x_j|^alpha / max|w_.j|^(1 - alpha)`` (SmoothQuant): the layer
    runs as ``(x / s) (W diag(s))^T``, which is the same function, with channel j's input range
    divided by ``s_j`` and its weights' range multiplied by it, so a few outlier channels no longer
    set every token's quantisation step. Channels without input or weight get ``s_j = 1``."""
    x, w = act_absmax.double(), weight_absmax.double()
    s = x.pow(alpha) / w.pow(1 - alpha)
    ok = (x > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)


def damped_hessian(hessian: Tensor, damp: float) -> Tensor:
    """``H + damp * mean(diag H) * I`` in float64, with dead inputs (``H_jj = 0``) set to ``H_jj = 1``
    so the factorisation exists (their weights see no input: any rounding is as good)."""
    h = hessian.double().clone()
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    return add_damping(h, damp, relative=True)


def obs_quantize(weight: Tensor, hessian: Tensor, keep: Tensor | None = None, *,
                 scale: Tensor | None = None, damp: float = 0.01, act_order: bool = True,
                 block: int = 128) -> Tensor:
    """Integer levels ``[N, K]`` (float tensor of integers in [-127, 127], 0 where ``keep`` is
    False) for ``weight [N, K]`` under the input Hessian ``hessian [K, K]`` (module docstring).

    ``scale``: per-row grid (default ``row_scales(weight)``). ``act_order``: fix the columns with
    the largest ``H_jj`` first (their errors then have the most freedom left to be absorbed).
    ``block``: columns per lazy-update batch (the result does not depend on it). Computes in
    float64; the returned levels dequantise as ``levels * scale[:, None]``.
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ObertError(f"hessian must be [{k}, {k}] for a weight with {k} inputs, got {tuple(hessian.shape)}")
    scale = (row_scales(weight) if scale is None else scale).double().to(weight.device)
    dev = weight.device
    keep = torch.ones(n, k, dtype=torch.bool, device=dev) if keep is None else keep.bool().to(dev)
    h = damped_hessian(hessian.to(dev), damp)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(k, device=dev)
    w = weight.double()[:, order].clone()
    keep = keep[:, order]
    h = h[order][:, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.zeros(n, i2 - i1, dtype=w.dtype, device=dev)
        for i in range(i2 - i1):
            lv = round_to_grid(w1[:, i:i + 1], scale).squeeze(1) * keep[:, i1 + i]
            levels[:, i1 + i] = lv
            e = (w1[:, i] - lv * scale) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]  # the block's errors reach the later columns at once
    return levels[:, torch.argsort(order)]
