"""Encoder self-attention on obert's CPU kernel, plugged into Transformers' attention registry.

``use_fast_attention(model)`` registers ``obert_cpu`` (an attention function and its mask
builder, the SDPA one) with ``transformers.AttentionInterface`` and switches the model to it. The
function runs ``softmax(scale q k^T + mask) v`` natively for float32 CPU inputs whose head dim is a
multiple of 16 (at most 128), without dropout, causal masking or per-head masks, and hands every
other case to PyTorch's SDPA unchanged, so switching is always safe. The kernel writes the output
already in the ``[batch, seq, heads, dim]`` layout the output projection reads (one copy fewer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from obert import native as kernels

NAME = "obert_cpu"


def shared_rows(mask: Tensor) -> Tensor:
    """A ``[B, 1, Sq, Sk]`` mask whose rows are all alike (padding) as ``[B, 1, 1, Sk]``, else
    unchanged: one shared row lets the kernel skip the padded keys of every query."""
    if mask.dim() == 4 and mask.shape[2] > 1 and torch.equal(mask.amin(2), mask.amax(2)):
        return mask[:, :, :1]
    return mask


def _mask(*args, **kwargs) -> Tensor | None:
    """``obert_cpu``'s mask builder: SDPA's, with padding masks collapsed to one row once per
    forward (rather than checked again in every layer)."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    return shared_rows(mask) if isinstance(mask, Tensor) else mask


def _additive_mask(mask: Tensor | None, batch: int, q_len: int, k_len: int) -> Tensor | None:
    """``[B|1, Sq|1, Sk]`` float32 additive mask from an SDPA-style one (bool: True attends), or
    ``None`` when there is none; raises ``ValueError`` for shapes the kernel does not take."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or \
            mask.shape[2] not in (1, q_len) or mask.shape[3] != k_len:
        raise ValueError("per-head or unexpected mask shape")
    m = shared_rows(mask)[:, 0]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, float("-inf"))
    return m.float().contiguous()


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """Transformers attention-interface function: ``(out [B, Sq, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    native = (query.device.type == "cpu" and query.dtype == torch.float32 and dropout == 0.0
              and not (causal and q_len > 1) and dim % 16 == 0 and dim <= 128
              and key.shape[1] == heads and value.shape[-1] == dim
              and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
              and not kwargs.get("output_attentions", False) and kwargs.get("cache") is None)
    ext = kernels.load() if native else None
    if ext is not None:
        try:
            mask = _additive_mask(attention_mask, batch, q_len, key.shape[2])
        except ValueError:
            ext = None
    if ext is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    return ext.attention(query, key, value, mask, scale, kernels.isa_index()), None


def register() -> bool:
    """Register ``obert_cpu`` with Transformers; False where this Transformers has no registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    return True


def use_fast_attention(model: nn.Module) -> bool:
    """Switch a Transformers model's attention to ``obert_cpu``; False (model unchanged) where the
    model or this Transformers cannot."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") \
            or not hasattr(model, "set_attn_implementation") or not register():
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):
        return False
    return True
