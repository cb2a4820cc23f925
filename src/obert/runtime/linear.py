"""``SparseLinear``: a pruned ``nn.Linear`` stored by its non-zeros and run by the sparse kernels."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ObertError
from . import kernels


ROWS = 16  # output rows per block of the native layout (the kernel's ROWS)
CHUNK = 64  # input columns per chunk: 64 x 64 tokens x 4 bytes = 16 KB of packed input in L1


def pack_weight(weight: Tensor, group: int = 1, chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """``(seg_ptr, col, val)``: the non-zeros of ``weight [N, K]`` in the kernel's segment layout.

    Entries are single weights (``group=1``) or blocks of 4 consecutive input weights with any
    non-zero (``group=4``; ``col`` = first k, ``val`` 4 values each). Segment
    ``s = (row_block * chunks + chunk) * ROWS + r`` holds the entries of row
    ``row_block * ROWS + r`` whose k lies in that chunk; rows past N are empty.
    """
    n, k = weight.shape
    if k % group or chunk % group:
        raise ObertError(f"input size {k} and chunk {chunk} must be multiples of the block size {group}")
    w = weight.detach().float()
    blocks = w.reshape(n, k // group, group)
    keep = (blocks != 0).any(-1)  # [n, k / group]
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: sorted by row, then k
    kk = cols * group
    row_blocks, chunks = -(-n // ROWS), -(-k // chunk)
    seg = ((rows // ROWS) * chunks + kk // chunk) * ROWS + rows % ROWS
    order = torch.argsort(seg, stable=True)
    counts = torch.bincount(seg, minlength=row_blocks * chunks * ROWS)
    seg_ptr = torch.zeros(row_blocks * chunks * ROWS + 1, dtype=torch.int64)
    seg_ptr[1:] = counts.cumsum(0)
    col = kk[order].to(torch.int32)
    val = blocks[rows[order], cols[order]].reshape(-1).contiguous()
    return seg_ptr, col, val


def unpack_weight(seg_ptr: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int], group: int,
                  chunk: int = CHUNK) -> Tensor:
    """The dense ``[N, K]`` weight back from the segment layout."""
    n, k = shape
    chunks = -(-k // chunk)
    seg = torch.repeat_interleave(torch.arange(seg_ptr.numel() - 1), seg_ptr[1:] - seg_ptr[:-1])
    rows = (seg // (chunks * ROWS)) * ROWS + seg % ROWS
    w = torch.zeros(n, k)
    cols = col.long().unsqueeze(1) + torch.arange(group)
    w[rows.unsqueeze(1).expand_as(cols), cols] = val.reshape(-1, group)
    return w


class SparseLinear(nn.Module):
    """``y = x W^T + b`` computed from ``W``'s non-zeros (float32; unstructured or block4)."""

    def __init__(self, in_features: int, out_features: int, seg_ptr: Tensor, col: Tensor,
                 val: Tensor, bias: Tensor | None, group: int, chunk: int = CHUNK) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.chunk = group, chunk
        self.register_buffer("seg_ptr", seg_ptr)
        self.register_buffer("col", col)
        self.register_buffer("val", val)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._csr: Tensor | None = None  # the fallback's torch CSR weight, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str = "float32", group: int | None = None) -> "SparseLinear":
        """From a pruned Linear; ``group`` 4 (block4) when every zero lies in a zero block of 4."""
        if dtype != "float32":
            raise ObertError(f"unsupported sparse dtype '{dtype}' (float32 for now)")
        w = linear.weight.detach()
        if group is None:
            group = 4 if w.shape[1] % 4 == 0 and _is_block4(w) else 1
        seg_ptr, col, val = pack_weight(w, group)
        return cls(w.shape[1], w.shape[0], seg_ptr, col, val, linear.bias, group)

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def to_dense_weight(self) -> Tensor:
        return unpack_weight(self.seg_ptr, self.col, self.val, (self.out_features, self.in_features),
                             self.group, self.chunk)

    def _fallback(self, x2: Tensor) -> Tensor:
        if self._csr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._csr = self.to_dense_weight().to_sparse_csr()
        return kernels.csr_linear(x2, self._csr, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            return F.linear(x, self.to_dense_weight().to(x.dtype), None if self.bias is None
                            else self.bias.to(x.dtype))
        ext = kernels.load()
        if ext is None:
            y = self._fallback(x2)
        else:
            y = ext.sparse_linear(x2, self.seg_ptr, self.col, self.val, self.bias, self.out_features,
                                  self.group, self.chunk)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'block4' if self.group == 4 else 'unstructured'}, density={self.density:.3f}")


def _is_block4(w: Tensor) -> bool:
    blocks = w.reshape(w.shape[0], -1, 4) != 0
    return bool((blocks.any(-1) == blocks.all(-1)).all())
