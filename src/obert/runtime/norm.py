"""BERT-style output blocks (``dense`` -> dropout -> ``LayerNorm(h + residual)``) with the residual
add and the LayerNorm in one native pass (``csrc/layer_norm.cpp``) instead of two."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from obert import native as kernels


class AddNorm(nn.Module):
    """Drop-in for ``BertSelfOutput`` / ``BertOutput`` and their kin: same children (``dense``,
    ``dropout``, ``LayerNorm``), so the same state dict; ``forward(hidden_states, input_tensor)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.train(block.training)  # a new module starts in training mode: keep the block's

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        h = self.dropout(self.dense(hidden_states))
        norm = self.LayerNorm
        native = (not self.training and h.device.type == "cpu" and h.dtype == torch.float32
                  and input_tensor.dtype == torch.float32 and h.shape == input_tensor.shape
                  and norm.weight is not None and norm.bias is not None)
        ext = kernels.load() if native else None
        if ext is None:
            return norm(h + input_tensor)
        n = h.shape[-1]
        return ext.add_layer_norm(h.reshape(-1, n), input_tensor.reshape(-1, n), norm.weight,
                                  norm.bias, norm.eps, kernels.isa_index()).reshape(h.shape)


def is_output_block(module: nn.Module) -> bool:
    """A BERT-family output block: ``dense``, ``dropout`` and an affine ``LayerNorm`` over the last
    dim, and the ``forward(hidden_states, input_tensor)`` of those classes (``...Output``)."""
    norm = getattr(module, "LayerNorm", None)
    return (type(module).__name__.endswith("Output") and hasattr(module, "dense")
            and isinstance(getattr(module, "dropout", None), nn.Dropout)
            and isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
            and norm.elementwise_affine)
