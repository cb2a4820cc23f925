"""Sparse kernels (issue 4, in progress): outputs against dense ``F.linear`` in float64."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from obert.runtime import SparseLinear, pack_weight, unpack_weight
from obert.runtime import kernels


def pruned_linear(n_out, n_in, sparsity, group, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    w = lin.weight.data
    if group == 1:
        w.mul_(torch.rand_like(w) >= sparsity)
    else:
        w.mul_((torch.rand(n_out, n_in // 4) >= sparsity).repeat_interleave(4, 1))
    return lin


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler: the PyTorch fallback runs")
def test_native_kernels_build_here():
    assert kernels.native_available()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("shape", [(1, 8, 3), (5, 16, 7), (63, 64, 17), (64, 32, 16), (130, 200, 33),
                                   (257, 40, 50), (70, 132, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_linear_matches_dense(shape, sparsity, group, threads):
    tokens, n_in, n_out = shape
    lin = pruned_linear(n_out, n_in, sparsity, group, seed=tokens + n_in)
    lin.weight.data[1 % n_out] = 0  # an empty row
    lin.weight.data[:, : min(4, n_in)] = 0  # empty columns
    sl = SparseLinear.from_linear(lin, group=group)
    x = torch.randn(tokens, n_in)
    expected = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = sl(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl._fallback(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_sparse_linear_batched_input_no_bias_and_storage():
    lin = pruned_linear(24, 32, 0.8, 4, bias=False)
    sl = SparseLinear.from_linear(lin)
    assert sl.group == 4 and sl.bias is None  # block structure detected
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(sl(x).double(), F.linear(x.double(), lin.weight.double()),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.to_dense_weight(), lin.weight.data)
    seg_ptr, col, val = pack_weight(lin.weight.data, 4)
    assert val.numel() == 4 * col.numel() == int((lin.weight != 0).sum())
    assert int(seg_ptr[-1]) == col.numel()
    torch.testing.assert_close(unpack_weight(seg_ptr, col, val, (24, 32), 4), lin.weight.data)
    assert SparseLinear.from_linear(pruned_linear(8, 16, 0.5, 1, seed=3)).group == 1
