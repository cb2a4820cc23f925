"""``SparseLinear``: a pruned ``nn.Linear`` stored by its non-zeros and run by the sparse kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ObertError
from . import kernels


def csr_from_dense(weight: Tensor, group: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_ptr, col, val)`` of ``weight [N, K]``: CSR for ``group=1``; for ``group=4`` one
    entry per block of 4 consecutive input weights that has any non-zero (``col`` its first k)."""
    n, k = weight.shape
    w = weight.detach().float()
    if group == 1:
        keep = w != 0
    else:
        if k % group:
            raise ObertError(f"input size {k} is not a multiple of the block size {group}")
        keep = (w.reshape(n, k // group, group) != 0).any(-1)
    counts = keep.sum(1)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    rows, blocks = keep.nonzero(as_tuple=True)
    if group == 1:
        return row_ptr, blocks.to(torch.int32), w[rows, blocks].contiguous()
    vals = w.reshape(n, k // group, group)[rows, blocks]  # [nnz_blocks, 4]
    return row_ptr, (blocks * group).to(torch.int32), vals.reshape(-1).contiguous()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` computed from ``W``'s non-zeros (float32; unstructured or block4)."""

    def __init__(self, in_features: int, out_features: int, row_ptr: Tensor, col: Tensor,
                 val: Tensor, bias: Tensor | None, group: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col", col)
        self.register_buffer("val", val)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str = "float32", group: int | None = None) -> "SparseLinear":
        """From a pruned Linear; ``group`` 4 (block4) when every zero lies in a zero block of 4."""
        if dtype != "float32":
            raise ObertError(f"unsupported sparse dtype '{dtype}' (float32 for now)")
        w = linear.weight.detach()
        if group is None:
            group = 4 if w.shape[1] % 4 == 0 and _is_block4(w) else 1
        row_ptr, col, val = csr_from_dense(w, group)
        return cls(w.shape[1], w.shape[0], row_ptr, col, val, linear.bias, group)

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def to_dense_weight(self) -> Tensor:
        w = torch.zeros(self.out_features, self.in_features)
        rows = torch.repeat_interleave(torch.arange(self.out_features),
                                       (self.row_ptr[1:] - self.row_ptr[:-1]).long())
        if self.group == 1:
            w[rows, self.col.long()] = self.val
        else:
            cols = self.col.long().unsqueeze(1) + torch.arange(self.group)
            w[rows.unsqueeze(1).expand_as(cols), cols] = self.val.reshape(-1, self.group)
        return w

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            return F.linear(x, self.to_dense_weight().to(x.dtype), None if self.bias is None
                            else self.bias.to(x.dtype))
        y = kernels.sparse_linear(x2, self.row_ptr, self.col, self.val, self.bias,
                                  self.out_features, self.group)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'block4' if self.group == 4 else 'unstructured'}, density={self.density:.3f}")


def _is_block4(w: Tensor) -> bool:
    blocks = w.reshape(w.shape[0], -1, 4) != 0
    return bool((blocks.any(-1) == blocks.all(-1)).all())
