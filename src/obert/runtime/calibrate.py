"""Calibration statistics for int8 compilation: each Linear layer's input Hessian ``H = X^T X``
and the largest ``|x_j|`` of each input channel.

``input_stats(model, batches, names)`` runs the (uncompiled, float) model over calibration
batches and sums ``x x^T`` over every real token's input to each named Linear layer (padding
tokens, where the batch has an ``attention_mask``, are left out). Layers fed the very same tensor
(a block's Q, K and V) share one ``InputStats``. ``quantize.obs_quantize`` turns the Hessians into
OBS rounding, ``quantize.smoothing_factors`` the channel maxima into input smoothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obert.errors import ObertError
from obert.device import GiB, available_memory

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class InputStats:
    """Of one layer input over the calibration tokens: ``hessian = sum_t x_t x_t^T`` (float64)
    and ``absmax[j] = max_t |x_tj|``."""

    hessian: Tensor
    absmax: Tensor


def text_batches(tokenizer, texts: list[str], pairs: list[str] | None = None, *,
                 batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Calibration batches (``input_ids``, ``attention_mask``, ...) of raw text, padded per batch."""
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(dict(tokenizer(texts[i:i + batch_size], pairs[i:i + batch_size] if pairs else None,
                                  truncation=True, max_length=max_length, padding=True,
                                  return_tensors="pt")))
    return out


def hessian_bytes(model: nn.Module, names: list[str]) -> int:
    """Upper bound of the float64 accumulators for ``names`` (as if no two layers shared one)."""
    return sum(8 * model.get_submodule(n).in_features ** 2 for n in names)


@torch.no_grad()
def input_stats(model: nn.Module, batches: Iterable[dict], names: list[str],
                progress: bool = True) -> dict[str, InputStats]:
    """``{name: InputStats}`` over the calibration tokens for the named Linear layers of
    ``model``; layers sharing an input tensor share one ``InputStats`` object."""
    need = hessian_bytes(model, names)
    free = available_memory(torch.device("cpu"))
    if need > free // 2:
        raise ObertError(f"int8 calibration needs up to {need / GiB:.1f} GiB for input Hessians, "
                         f"{free / GiB:.1f} GiB free: calibrate fewer layers (include/exclude)")
    stats: dict[str, InputStats] = {}  # per accumulating layer
    owner: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
    # id of an input tensor in this forward -> (the tensor, kept alive so no other tensor can
    # take its id during the forward, and the first layer fed it)
    seen: dict[int, tuple[Tensor, str]] = {}
    tokens: list[Tensor | None] = [None]  # this batch's real-token mask, [B * S]

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = owner.setdefault(name, seen.setdefault(id(x), (x, name))[1])
            if key != name:
                return  # the same input reached an earlier layer: its H serves this one too
            x2 = x.detach().reshape(-1, x.shape[-1])
            if tokens[0] is not None and tokens[0].numel() == x2.shape[0]:
                x2 = x2[tokens[0]]
            x2 = x2.double()
            k = x2.shape[1]
            st = stats.get(key)
            if st is None:
                st = stats[key] = InputStats(torch.zeros(k, k, dtype=torch.float64, device=x2.device),
                                             torch.zeros(k, dtype=torch.float64, device=x2.device))
            st.hessian.addmm_(x2.T, x2)
            if x2.shape[0]:
                torch.maximum(st.absmax, x2.abs().amax(0), out=st.absmax)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        count = 0
        for batch in tqdm(batches, desc="int8 calibration", disable=not progress, leave=False):
            inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
            if "input_ids" not in inputs:
                raise ObertError("calibration batches need input_ids")
            mask = inputs.get("attention_mask")
            tokens[0] = None if mask is None else mask.reshape(-1).bool()
            seen.clear()
            model(**inputs)
            count += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ObertError("no calibration batches")
    missing = [n for n in names if owner.get(n) not in stats]
    if missing:
        raise ObertError(f"calibration never reached {missing[:3]}")
    cpu = {k: InputStats(st.hessian.cpu(), st.absmax.cpu()) for k, st in stats.items()}  # where the kernels are
    return {n: cpu[owner[n]] for n in names}
