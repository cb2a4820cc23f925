"""``SparseLinear``: a pruned ``nn.Linear`` stored by its non-zeros and run by the sparse kernels."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obert.errors import ObertError
from obert.core.quantize import obs_quantize, round_to_grid, row_scales
from obert import native as kernels


ROWS = kernels.ROWS  # output rows per block of the segment layout
INT8_CHUNK = 4096  # int8: whole rows up to this input size (long segments beat an L1-sized chunk)
WHOLE_ROWS = 1024  # float32: inputs up to this size run whole rows (one segment per row)
FP32_CHUNK = 384  # float32, larger inputs: chunks of 384 columns


def fp32_tile(tokens: int, in_features: int) -> int:
    """Tokens per tile of the float32 kernel: 64, or 32 for long inputs to wide layers (measured,
    2 threads, 90%: 64 beats 32 by 4-10% at 128 and 2,048 tokens on 384- and 768-wide inputs;
    32 wins by ~7% on 3,072-wide inputs at 2,048 tokens, where rows run in 384-column chunks)."""
    return 32 if tokens > 512 and in_features > WHOLE_ROWS else 64


def fp32_chunk(in_features: int) -> int:
    """Input columns per chunk of the float32 kernel (see csrc/sparse_linear.cpp for why)."""
    return in_features if in_features <= WHOLE_ROWS else FP32_CHUNK


def pack_weight(weight: Tensor, group: int = 1, chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(seg_ptr, col, val)``: the non-zeros of ``weight [N, K]`` in the kernel's segment layout.

    Entries are single weights (``group=1``) or blocks of 4 consecutive input weights with any
    non-zero (``group=4``; ``col`` = first k, ``val`` 4 values each). Segment
    ``s = (row_block * chunks + chunk) * ROWS + r`` holds the entries of row
    ``row_block * ROWS + r`` whose k lies in that chunk; rows past N are empty.
    """
    n, k = weight.shape
    chunk = chunk or fp32_chunk(k)
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
                  chunk: int) -> Tensor:
    """The dense ``[N, K]`` weight back from the segment layout."""
    n, k = shape
    rows = _entry_rows(seg_ptr, k, chunk)
    w = torch.zeros(n, k, device=val.device)
    cols = col.long().unsqueeze(1) + torch.arange(group, device=col.device)
    w[rows.unsqueeze(1).expand_as(cols), cols] = val.reshape(-1, group)
    return w


ACTIVATIONS = {None: 0, "gelu": 1}  # epilogues the kernels fuse (GELU: the exact, erf one)


def csr_linear(x: Tensor, weight_csr: Tensor, bias: Tensor | None) -> Tensor:
    """The fallback: ``x @ W^T + b`` through PyTorch's CSR matmul (correct, not fast)."""
    y = torch.sparse.mm(weight_csr, x.t().contiguous()).t()
    return y + bias if bias is not None else y.contiguous()



class SparseLinear(nn.Module):
    """``y = act(x W^T + b)`` computed from ``W``'s non-zeros (float32 or int8; unstructured or
    block4); ``act`` is the identity or GELU fused into the kernel's output pass."""

    def __init__(self, in_features: int, out_features: int, seg_ptr: Tensor, col: Tensor,
                 val: Tensor, bias: Tensor | None, group: int, chunk: int,
                 w_scale: Tensor | None = None, row_sum: Tensor | None = None,
                 activation: str | None = None, in_mul: Tensor | None = None) -> None:
        """``val`` float32 values, or int8 ones with per-row ``w_scale`` and ``row_sum`` (int8)
        and optionally ``in_mul`` (int8: per input channel factor applied before quantising the
        input; the stored weights are the layer's times ``1 / in_mul`` per column)."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ObertError(f"unsupported fused activation '{activation}' (gelu or none)")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.chunk, self.activation = group, chunk, activation
        self.quantized = val.dtype == torch.int8
        if self.quantized and (group != 4 or w_scale is None or row_sum is None):
            raise ObertError("int8 sparse layers are block4 with per-row scales and sums")
        if in_mul is not None and (not self.quantized or in_mul.numel() != in_features):
            raise ObertError("in_mul is for int8 layers, one factor per input feature")
        self.register_buffer("seg_ptr", seg_ptr)
        self.register_buffer("col", col)
        self.register_buffer("val", val)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("row_sum", row_sum)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("in_mul", None if in_mul is None else in_mul.detach().float().contiguous())
        self._csr: Tensor | None = None  # the fallback's torch CSR weight, built on first use

    def __getstate__(self) -> dict:
        # The fallback's CSR cache is rebuilt on first use: torch cannot copy or pickle a CSR
        # tensor's storage (deepcopy of a model that ran on the fallback failed).
        return {**super().__getstate__(), "_csr": None}

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str = "float32", group: int | None = None,
                    hessian: Tensor | None = None, smooth: Tensor | None = None) -> "SparseLinear":
        """From a pruned Linear; ``group`` 4 (block4) when every zero lies in a zero block of 4.

        ``dtype="int8"`` (block4 only): weights quantised per output row to ``q s_n`` with
        ``s_n = max|w_n| / 127``, ``q`` in [-127, 127]: rounded to nearest, or, given the layer's
        input Hessian ``hessian = X^T X`` from calibration inputs, by OBS rounding
        (``quantize.obs_quantize``: each rounding error is absorbed by the row's later kept
        weights; pruned blocks stay 0). Inputs are quantised per token at run time to unsigned
        bytes with a scale and zero point (see ``quantize_tokens``). ``smooth`` (int8, ``s [K]``):
        the layer runs as ``(x / s) (W diag(s))^T``, moving outlier input channels' range into
        the weights (``quantize.smoothing_factors``); the Hessian is then taken as ``X^T X``
        of the unscaled inputs and rescaled here.
        """
        if dtype not in ("float32", "int8"):
            raise ObertError(f"unsupported sparse dtype '{dtype}' (float32 or int8)")
        w = linear.weight.detach().float()
        if group is None:
            group = 4 if w.shape[1] % 4 == 0 and is_block4(w) else 1
        if (hessian is not None or smooth is not None) and dtype != "int8":
            raise ObertError("calibration (Hessian, smoothing) is for int8 layers only")
        if dtype == "int8":
            if group != 4:
                raise ObertError("int8 needs block4 sparsity (groups of 4 consecutive input weights)")
            kept = (w.reshape(w.shape[0], -1, 4) != 0).any(-1)
            in_mul = None
            if smooth is not None:
                in_mul = 1 / smooth.float().to(w.device)
                w = w / in_mul  # W diag(s), in the same float32 the kernel's x * in_mul pairs with
                if hessian is not None:  # the Hessian of x / s
                    d = in_mul.double().to(hessian.device)
                    hessian = hessian * d[:, None] * d[None, :]
            scale = row_scales(w)
            if hessian is None:
                q = round_to_grid(w, scale)
            else:
                q = obs_quantize(w, hessian, kept.repeat_interleave(4, 1), scale=scale).float()
            chunk = min(w.shape[1], INT8_CHUNK)
            seg_ptr, col, _ = pack_weight(w, 4, chunk)
            # Quantised values of the kept blocks (a weight may round to 0 inside a kept block).
            rows = _entry_rows(seg_ptr, w.shape[1], chunk)
            qval = q[rows.unsqueeze(1), col.long().unsqueeze(1) + torch.arange(4)].to(torch.int8)
            row_sum = torch.zeros(w.shape[0], dtype=torch.int32)
            row_sum.index_add_(0, rows, qval.int().sum(1, dtype=torch.int32))
            return cls(w.shape[1], w.shape[0], seg_ptr, col, qval.reshape(-1).contiguous(),
                       linear.bias, 4, chunk, scale.contiguous(), row_sum, in_mul=in_mul)
        chunk = fp32_chunk(w.shape[1])
        seg_ptr, col, val = pack_weight(w, group, chunk)
        return cls(w.shape[1], w.shape[0], seg_ptr, col, val, linear.bias, group, chunk)

    @property
    def nnz(self) -> int:
        """Stored weights (for block4: 4 per kept block)."""
        return int(self.val.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def _stored_weight(self) -> Tensor:
        """The stored weight as a dense float32 tensor (dequantised for int8; for a smoothed int8
        layer that is the weight of the scaled input ``x * in_mul``)."""
        val = self.val.float()
        if self.quantized:
            rows = _entry_rows(self.seg_ptr, self.in_features, self.chunk)
            val = (val.reshape(-1, 4) * self.w_scale[rows, None]).reshape(-1)
        return unpack_weight(self.seg_ptr, self.col, val, (self.out_features, self.in_features),
                             self.group, self.chunk)

    def to_dense_weight(self) -> Tensor:
        """The layer's weight as a dense float32 tensor (dequantised for int8): ``y = x W^T + b``."""
        w = self._stored_weight()
        return w if self.in_mul is None else w * self.in_mul

    def _fallback(self, x2: Tensor) -> Tensor:
        if self.quantized:  # the same quantised arithmetic, in float
            x2 = quantize_tokens(x2 if self.in_mul is None else x2 * self.in_mul)
        if self._csr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._csr = self._stored_weight().to_sparse_csr()
        y = csr_linear(x2, self._csr, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, self.in_features)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or x2.device.type != "cpu":
            # The kernels are CPU float32; elsewhere (CUDA, half precision) run the dense weight
            # so a compiled model still works after .to(device) / .half(), just not sparsely.
            y = F.linear(x, self.to_dense_weight().to(x.dtype), None if self.bias is None
                         else self.bias.to(x.dtype))
            return F.gelu(y) if self.activation == "gelu" else y
        ext = kernels.load()
        act = ACTIVATIONS[self.activation]
        if ext is None:
            y = self._fallback(x2)
        elif self.quantized:
            y = ext.sparse_linear_int8(x2, self.seg_ptr, self.col, self.val, self.w_scale,
                                       self.row_sum, self.bias, self.out_features, self.chunk, act,
                                       self.in_mul, kernels.isa_index())
        else:
            y = ext.sparse_linear(x2, self.seg_ptr, self.col, self.val, self.bias, self.out_features,
                                  self.group, self.chunk,
                                  fp32_tile(*x2.shape), act, kernels.isa_index())
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{'block4' if self.group == 4 else 'unstructured'}, "
                f"{'int8' if self.quantized else 'float32'}, density={self.density:.3f}"
                + (f", activation={self.activation}" if self.activation else ""))


FFN_TILE = 64  # tokens per tile of the fused float32 feed-forward kernel (int8: ext.INT8_TILE)


class SparseFFN(nn.Module):
    """``y = fc2(fc1(x))`` for a feed-forward block whose two layers are sparse (``fc1`` applies
    its activation itself), run by one kernel a token tile at a time: the hidden activations (4x
    wider than the block's input) stay in the thread's cache and are never written to memory,
    transposed or packed again (for int8 they are quantised straight into ``fc2``'s input; the
    result is bit-for-bit that of running the two layers in turn). Inputs with fewer tiles than
    threads run the two layers one after the other, which shares each layer's rows out instead."""

    def __init__(self, fc1: SparseLinear, fc2: SparseLinear) -> None:
        super().__init__()
        if fc1.out_features != fc2.in_features or fc1.quantized != fc2.quantized:
            raise ObertError("a fused feed-forward block needs fc1's outputs as fc2's inputs, "
                             "both float32 or both int8")
        self.fc1, self.fc2 = fc1, fc2
        self.in_features, self.out_features = fc1.in_features, fc2.out_features

    def forward(self, x: Tensor) -> Tensor:
        check_width(x, self.in_features)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ext = kernels.load() if x2.dtype == torch.float32 and x2.device.type == "cpu" else None
        if ext is None:
            return self.fc2(self.fc1(x))
        tile = ext.INT8_TILE if self.fc1.quantized else FFN_TILE
        if -(-x2.shape[0] // tile) < torch.get_num_threads():
            return self.fc2(self.fc1(x))
        a, b = self.fc1, self.fc2
        act = ACTIVATIONS[a.activation]
        if a.quantized:
            y = ext.sparse_ffn_int8(x2, a.seg_ptr, a.col, a.val, a.w_scale, a.row_sum, a.bias,
                                    a.out_features, a.chunk, act, b.seg_ptr, b.col, b.val,
                                    b.w_scale, b.row_sum, b.bias, b.out_features, b.chunk,
                                    a.in_mul, b.in_mul, kernels.isa_index())
        else:
            y = ext.sparse_ffn(x2, a.seg_ptr, a.col, a.val, a.bias, a.out_features, a.group, a.chunk,
                               act, b.seg_ptr, b.col, b.val, b.bias, b.out_features, b.group,
                               b.chunk, FFN_TILE, kernels.isa_index())
        return y.reshape(*shape[:-1], self.out_features)


def check_width(x: Tensor, in_features: int) -> None:
    """The kernels index the input by the stored column numbers: a narrower one would be read
    past its end."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ObertError(f"input of shape {tuple(x.shape)}: the layer takes {in_features} features")


def quantize_tokens(x: Tensor) -> Tensor:
    """``x [T, K]`` after the int8 kernels' per-token input quantisation, as float32:
    ``(clamp(round(x / s_t) + z_t, 0, 255) - z_t) s_t`` with ``s_t = (hi_t - lo_t) / 255`` and
    ``z_t = round(-lo_t / s_t)``, ``lo_t = min(0, min x[t])``, ``hi_t = max(0, max x[t])``, and
    ``s_t = 1`` when ``hi_t - lo_t`` is below 255 times the smallest normal float32 (the same
    float32 operations and round-half-even as the kernels, so the values are identical)."""
    lo = x.amin(1, keepdim=True).clamp(max=0)
    hi = x.amax(1, keepdim=True).clamp(min=0)
    # 1 where the range is too small for a normal scale (its inverse would overflow)
    scale = torch.where(hi - lo >= 255 * torch.finfo(torch.float32).tiny, (hi - lo) / 255,
                        torch.ones_like(hi))
    inv = 1 / scale
    zero = torch.round(-lo * inv)
    return ((torch.round(x * inv) + zero).clamp(0, 255) - zero) * scale


def _entry_rows(seg_ptr: Tensor, in_features: int, chunk: int) -> Tensor:
    """Output row of every entry of the segment layout."""
    chunks = -(-in_features // chunk)
    seg = torch.repeat_interleave(torch.arange(seg_ptr.numel() - 1, device=seg_ptr.device),
                                  seg_ptr[1:] - seg_ptr[:-1])
    return (seg // (chunks * ROWS)) * ROWS + seg % ROWS


BLOCK4_SLACK = 1.05  # block4 when storing whole blocks costs at most 5% more weights


def is_block4(w: Tensor) -> bool:
    """Block4-structured: the kept blocks of 4 hold the non-zeros with at most 5% padding (a
    weight that is exactly zero inside a kept block, e.g. from initialisation, does not count)."""
    kept = int((w.reshape(w.shape[0], -1, 4) != 0).any(-1).sum())
    return 4 * kept <= BLOCK4_SLACK * max(int((w != 0).sum()), 1)
