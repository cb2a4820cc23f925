"""The int8 kernels' arithmetic in float, for training and export: per-row symmetric weights
(``s_n = max|w_n| / 127``) and per-token asymmetric unsigned 8-bit inputs (``quantize_tokens``),
with straight-through gradients. ``fake_quantize`` runs chosen Linear modules this way, so a
model computes what its compiled int8 version computes."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obert.core.quantize import round_to_grid, row_scales
from obert.runtime.linear import quantize_tokens


def fake_quant_weight(w: Tensor) -> Tensor:
    """``w`` on its per-row int8 grid, with the identity's gradient."""
    s = row_scales(w.detach())
    return w + (round_to_grid(w.detach(), s) * s[:, None] - w).detach()


def fake_quant_tokens(x: Tensor) -> Tensor:
    """``x [..., K]`` as the int8 kernels quantise it per token, with the identity's gradient."""
    q = quantize_tokens(x.detach().reshape(-1, x.shape[-1]).float()).reshape(x.shape).to(x.dtype)
    # x + (q - x) is not q in floating point: the exact q where no gradient is wanted
    return x + (q - x).detach() if x.requires_grad else q


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    x = fake_quant_tokens(x) if self.obert_quantize_inputs else x
    w = fake_quant_weight(self.weight) if self.obert_quantize_weights else self.weight
    return F.linear(x, w, self.bias)


def fake_quantize(model: nn.Module, names: list[str], inputs: bool = True,
                  weights: bool = True) -> None:
    """Run the Linear modules ``names`` of ``model`` with fake quantisation (undo: ``remove``);
    ``weights=False`` for weights already on their grid (quantisation-aware training's output)."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        m.obert_quantize_inputs, m.obert_quantize_weights = inputs, weights
        m.forward = types.MethodType(_forward, m)


def remove(model: nn.Module) -> None:
    """Plain forwards again (the weights stay as they are)."""
    for m in model.modules():
        if "forward" in vars(m) and hasattr(m, "obert_quantize_inputs"):
            del m.forward, m.obert_quantize_inputs, m.obert_quantize_weights


@torch.no_grad()
def bake(model: nn.Module, names: list[str]) -> None:
    """Replace the weights of ``names`` by their int8 grid values ``q s_n``."""
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight
        s = row_scales(w)
        w.copy_(round_to_grid(w, s) * s[:, None])
