"""Sparse kernels: outputs against dense ``F.linear`` in float64."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from obert.runtime import SparseLinear, pack_weight, unpack_weight
from obert.runtime.linear import fp32_chunk
from obert import native as kernels


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pruned_linear(n_out, n_in, sparsity, group, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)
    w = lin.weight.data
    if group == 1:
        w.mul_(torch.rand_like(w) >= sparsity)
    else:
        w.mul_((torch.rand(n_out, n_in // 4) >= sparsity).repeat_interleave(4, 1))
    return lin


def native(isa: str):
    """The extension, for tests that call a kernel directly (skipped without one)."""
    if isa == "none":
        pytest.skip("no native kernels here")
    return kernels.load()


needs_native = pytest.mark.skipif(not kernels.native_available(),
                                  reason="no native kernels here: the PyTorch fallback runs")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None
                    or bool(os.environ.get("OBERT_NO_NATIVE")),
                    reason="no C++ compiler: the PyTorch fallback runs")
def test_native_kernels_build_here():
    assert kernels.native_available()
    assert kernels.load().ROWS == kernels.ROWS  # the layout constant reaches the C++ build


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("shape", [(1, 8, 3), (5, 16, 7), (63, 64, 17), (64, 32, 16), (130, 200, 33),
                                   (257, 40, 50), (70, 132, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_sparse_linear_matches_dense(shape, sparsity, group, threads, isa):
    tokens, n_in, n_out = shape
    lin = pruned_linear(n_out, n_in, sparsity, group, seed=tokens + n_in)
    lin.weight.data[1 % n_out] = 0  # an empty row
    lin.weight.data[:, : min(4, n_in)] = 0  # empty columns
    sl = SparseLinear.from_linear(lin, group=group)
    x = torch.randn(tokens, n_in)
    expected = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    with num_threads(threads):
        got = sl(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl._fallback(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("shape,chunk", [((40, 1100, 24), None), ((33, 1100, 17), 192), ((17, 300, 35), 8),
                                         ((50, 300, 16), 100), ((16, 64, 16), 12), ((70, 1028, 40), 1028),
                                         ((600, 96, 20), None), ((131, 40, 33), None)])
def test_sparse_linear_chunks_and_tiles(shape, chunk, group, isa):
    """Several chunks per row (segments), 16- and 32-token tiles, a last chunk cut short."""
    tokens, n_in, n_out = shape
    lin = pruned_linear(n_out, n_in, 0.85, group, seed=n_in + n_out)
    chunk = chunk or fp32_chunk(n_in)
    seg_ptr, col, val = pack_weight(lin.weight.data, group, chunk)
    sl = SparseLinear(n_in, n_out, seg_ptr, col, val, lin.bias, group, chunk)
    x = torch.randn(tokens, n_in)
    expected = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    ext = kernels.load()
    for threads in (1, 2):
        with num_threads(threads):
            torch.testing.assert_close(sl(x).double(), expected, rtol=1e-5, atol=1e-5)
            for tile in (16, 32, 64) if ext is not None else ():  # every tile width the kernel has
                got = ext.sparse_linear(x, seg_ptr, col, val, lin.bias, n_out, group, chunk, tile, 0,
                                         kernels.isa_index())
                torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.to_dense_weight(), lin.weight.data)


@pytest.mark.parametrize("dtype,group", [("float32", 1), ("float32", 4), ("int8", 4)])
def test_fused_gelu_matches_exact_gelu(dtype, group, isa):
    """GELU in the kernel epilogue (erf by a polynomial and a vector exp) against float64 erf GELU,
    pre-activations spread over +-12 so both tails and the centre are exercised."""
    lin = pruned_linear(48, 64, 0.6, group, seed=5)
    lin.weight.data *= 3
    sl = SparseLinear.from_linear(lin, dtype=dtype)
    sl.activation = "gelu"
    x = 3 * torch.randn(37, 64)
    pre = SparseLinear.from_linear(lin, dtype=dtype)(x).double()  # the kernel's own pre-activation
    assert float(pre.abs().max()) > 8 and float(pre.min()) < -8
    expected = F.gelu(pre)
    for threads in (1, 2):
        with num_threads(threads):
            torch.testing.assert_close(sl(x).double(), expected, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(sl._fallback(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert "activation=gelu" in repr(sl)
    with pytest.raises(Exception, match="unsupported fused activation"):
        SparseLinear(64, 48, sl.seg_ptr, sl.col, sl.val, None, sl.group, sl.chunk, activation="relu")


def test_input_of_the_wrong_width_is_refused():
    from obert.errors import ObertError
    from obert.runtime.linear import SparseFFN

    lin = pruned_linear(24, 32, 0.8, 4)
    fc1, fc2 = SparseLinear.from_linear(lin), SparseLinear.from_linear(pruned_linear(8, 24, 0.8, 1))
    for layer in (fc1, SparseLinear.from_linear(lin, dtype="int8"), SparseFFN(fc1, fc2)):
        for x in (torch.randn(5, 16), torch.randn(5, 40), torch.tensor(1.0)):
            with pytest.raises(ObertError, match="the layer takes 32 features"):
                layer(x)


def test_sparse_linear_batched_input_no_bias_and_storage():
    lin = pruned_linear(24, 32, 0.8, 4, bias=False)
    sl = SparseLinear.from_linear(lin)
    assert sl.group == 4 and sl.bias is None  # block structure detected
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(sl(x).double(), F.linear(x.double(), lin.weight.double()),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl.to_dense_weight(), lin.weight.data)
    seg_ptr, col, val = pack_weight(lin.weight.data, 4, chunk=8)
    assert val.numel() == 4 * col.numel() == int((lin.weight != 0).sum())
    assert int(seg_ptr[-1]) == col.numel()
    torch.testing.assert_close(unpack_weight(seg_ptr, col, val, (24, 32), 4, 8), lin.weight.data)
    assert SparseLinear.from_linear(pruned_linear(8, 16, 0.5, 1, seed=3)).group == 1
    # A weight that happens to be exactly 0 inside a kept block keeps the layer block4 (and int8-able).
    big = pruned_linear(64, 64, 0.7, 4, seed=4)
    kept = big.weight.data.reshape(64, 16, 4).ne(0).all(-1).nonzero()[0]
    big.weight.data[kept[0], 4 * kept[1] + 2] = 0.0
    assert SparseLinear.from_linear(big).group == 4
    x = torch.randn(5, 64)
    torch.testing.assert_close(SparseLinear.from_linear(big)(x).double(),
                               F.linear(x.double(), big.weight.double(), big.bias.double()),
                               rtol=1e-5, atol=1e-5)
    assert SparseLinear.from_linear(big, dtype="int8").quantized


def _pruned_tiny_model(sparsity=0.8):
    from conftest import tiny_model

    from obert import find_targets

    model = tiny_model("bert").eval()
    torch.manual_seed(1)
    for t in find_targets(model):
        w = t.module.weight.data
        w.mul_(torch.rand_like(w) >= sparsity)
    model.bert.encoder.layer[1].output.dense.weight.data.normal_()  # one dense layer stays dense
    return model


def test_compile_matches_the_model_and_reports_what_runs_sparse():
    import copy

    from obert.runtime import compile, sparse_modules

    model = _pruned_tiny_model()
    reference = copy.deepcopy(model)
    ids = torch.randint(5, 30, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    report = compile(model, choose="sparsity")
    assert len(report.sparse_layers) == 11 and report.dense_layers == ["bert.encoder.layer.1.output.dense"]
    n_layers = len(model.bert.encoder.layer)
    assert report.fused_activations == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(n_layers)]
    assert isinstance(model.bert.encoder.layer[0].intermediate.intermediate_act_fn, torch.nn.Identity)
    assert len(sparse_modules(model)) == 11
    assert 0.8 < report.sparse_fraction < 0.95 and "11 of 12" in report.summary()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)


def test_compiled_model_save_load_round_trip(tmp_path):
    from obert.errors import ObertError
    from obert.runtime import compile, load_compiled, save_compiled

    model = _pruned_tiny_model(0.9)
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    compile(model, choose="sparsity")
    save_compiled(model, tmp_path / "compiled")
    loaded = load_compiled(tmp_path / "compiled")
    ids = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    sparse_bytes = (tmp_path / "compiled" / "sparse_model.safetensors").stat().st_size
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    assert sparse_bytes < 0.85 * dense_bytes  # the encoder's Linear weights are 90% zeros
    with pytest.raises(ObertError, match="not a compiled"):
        load_compiled(dense_dir)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("groups", [(1, 1), (4, 1), (1, 4), (4, 4)])
@pytest.mark.parametrize("shape", [(64, 32, 40, 24), (200, 48, 1100, 20), (129, 16, 64, 16)])
def test_fused_ffn_float32_matches_float64(shape, groups, threads, isa):
    from obert.runtime.linear import SparseFFN

    tokens, n_in, hidden, n_out = shape
    lin1 = pruned_linear(hidden, n_in, 0.8, groups[0], seed=1)
    lin2 = pruned_linear(n_out, hidden, 0.9, groups[1], seed=2)
    lin2.weight.data[3] = 0  # an empty output row
    fc1 = SparseLinear.from_linear(lin1, group=groups[0])
    fc1.activation = "gelu"
    ffn = SparseFFN(fc1, SparseLinear.from_linear(lin2, group=groups[1]))
    x = torch.randn(tokens, n_in)
    expected = F.linear(F.gelu(F.linear(x.double(), lin1.weight.double(), lin1.bias.double())),
                        lin2.weight.double(), lin2.bias.double())
    with num_threads(threads):
        torch.testing.assert_close(ffn(x).double(), expected, rtol=1e-4, atol=1e-5)
        # and through the one-layer-at-a-time path the fused kernel replaces
        torch.testing.assert_close(ffn.fc2(ffn.fc1(x)).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(64, 32, 40, 24), (130, 48, 200, 20), (300, 16, 64, 8)])
@pytest.mark.parametrize("smooth", [False, True])
def test_fused_ffn_int8_equals_the_two_int8_layers(shape, threads, smooth, isa):
    from obert.runtime.linear import SparseFFN

    tokens, n_in, hidden, n_out = shape
    lin1 = pruned_linear(hidden, n_in, 0.7, 4, seed=3)
    lin2 = pruned_linear(n_out, hidden, 0.8, 4, seed=4)
    # Smoothing factors near 1 (as smoothing_factors gives on inputs without outliers): the
    # equality with two calls is the point; the accuracy bound below holds either way.
    s1, s2 = (torch.rand(n_in) * 0.5 + 0.75, torch.rand(hidden) * 0.5 + 0.75) if smooth else (None, None)
    fc1 = SparseLinear.from_linear(lin1, dtype="int8", smooth=s1)
    fc2 = SparseLinear.from_linear(lin2, dtype="int8", smooth=s2)
    fc1.activation = "gelu"
    x = torch.randn(tokens, n_in)
    x[5] = 0  # an all-zero token (scale 1)
    with num_threads(threads):
        fused = SparseFFN(fc1, fc2)(x)
        # The hidden activations are quantised in the cache exactly as fc2 quantises its input.
        assert torch.equal(fused, fc2(fc1(x)))
    exact = F.linear(F.gelu(F.linear(x.double(), lin1.weight.double(), lin1.bias.double())),
                     lin2.weight.double(), lin2.bias.double())
    assert (fused.double() - exact).abs().max() < 0.03 * exact.abs().max()
    with pytest.raises(Exception, match="both float32 or both int8"):
        SparseFFN(fc1, SparseLinear.from_linear(lin2))


def test_compile_fuses_ffn_blocks_and_saves_them(tmp_path):
    import copy

    from obert.runtime import compile, load_compiled, save_compiled
    from obert.runtime.linear import SparseFFN

    model = _pruned_tiny_model(0.9)
    model.bert.encoder.layer[1].output.dense.weight.data.mul_(
        torch.rand_like(model.bert.encoder.layer[1].output.dense.weight) > 0.9)
    reference = copy.deepcopy(model)
    report = compile(model, choose="sparsity")
    assert report.fused_ffn == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, SparseFFN) and isinstance(layer.output.dense, torch.nn.Identity)
    ids = torch.randint(5, 30, (3, 60))  # 180 tokens: 3 tiles, the fused kernel runs
    for threads in (1, 2):
        with torch.no_grad(), num_threads(threads):
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-5)
    save_compiled(model, tmp_path / "compiled")
    loaded = load_compiled(tmp_path / "compiled")
    assert isinstance(loaded.bert.encoder.layer[1].intermediate.dense, SparseFFN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    unfused = copy.deepcopy(reference)
    assert compile(unfused, fuse=False, choose="sparsity").fused_ffn == []


def _quantised_reference(x, lin, in_mul=None):
    """float64 y of the int8 scheme: per-row symmetric weight scales, per-token asymmetric input
    scales (scale and zero point in float32, as the kernel rounds with them; products in float64).
    ``in_mul``: smoothing, the input times in_mul (float32) and the weight divided by it."""
    w = lin.weight.double()
    if in_mul is not None:
        x = x * in_mul
        w = (lin.weight / in_mul).double()
    ws = (w.abs().amax(1) / 127).clamp(min=1e-12)
    qw = (w / ws[:, None]).round().clamp(-127, 127)
    lo = x.amin(1, keepdim=True).clamp(max=0)
    hi = x.amax(1, keepdim=True).clamp(min=0)
    xs = torch.where(hi - lo >= 255 * torch.finfo(torch.float32).tiny, (hi - lo) / 255, torch.ones_like(hi))
    zero = torch.round(-lo * (1 / xs))
    qx = (torch.round(x * (1 / xs)) + zero).clamp(0, 255) - zero
    return (qx.double() @ qw.t()) * xs.double() * ws + lin.bias.double()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 3), (70, 132, 16), (130, 200, 33), (64, 64, 64), (20, 1100, 24)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_int8_block4_is_exact_quantised_arithmetic(shape, sparsity, threads, isa):
    tokens, n_in, n_out = shape
    lin = pruned_linear(n_out, n_in, sparsity, 4, seed=tokens)
    sl = SparseLinear.from_linear(lin, dtype="int8")
    x = torch.randn(tokens, n_in)
    x[0] = 0  # an all-zero token
    if tokens > 1:  # a range too small for a normal scale (1 / s would overflow): quantised to 0
        x[-1] = torch.randn(n_in) * 1e-38
    expected = _quantised_reference(x, lin)
    assert torch.isfinite(expected).all()
    with num_threads(threads):
        got = sl(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sl._fallback(x).double(), expected, rtol=1e-5, atol=1e-4)
    # Against the float layer: the stated bound, 2% of the output range on Gaussian inputs.
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert float((got.double() - exact).abs().max()) <= 0.02 * float(exact.abs().max()) + 1e-6
    # One-sided inputs (GELU outputs, FC2's input) use the whole byte range: within 1% (a
    # symmetric per-token scale measured 0.8-1.04% on these, the zero point 0.58-0.71%).
    x = F.gelu(2 * torch.randn(tokens, n_in))
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert float((sl(x).double() - exact).abs().max()) <= 0.01 * float(exact.abs().max()) + 1e-6


def test_int8_needs_block4_and_compile_int8(tmp_path):
    from obert.errors import ObertError
    from obert.runtime import compile, load_compiled, save_compiled

    with pytest.raises(ObertError, match="block4"):
        SparseLinear.from_linear(pruned_linear(8, 16, 0.5, 1, seed=3), dtype="int8")
    from conftest import tiny_model

    from obert import find_targets

    model = tiny_model("bert").eval()
    torch.manual_seed(2)
    for t in find_targets(model):
        w = t.module.weight.data
        w.mul_((torch.rand(w.shape[0], w.shape[1] // 4) >= 0.8).repeat_interleave(4, 1))
    ids = torch.randint(5, 30, (4, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    report = compile(model, dtype="int8", choose="sparsity")
    assert report.float32_layers == [] and all(m.quantized for m in __import__("obert.runtime", fromlist=["x"]).sparse_modules(model).values())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    save_compiled(model, tmp_path / "c8")
    with torch.no_grad():
        torch.testing.assert_close(load_compiled(tmp_path / "c8")(input_ids=ids).logits, got)


def test_onnx_export_of_a_pruned_model_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from obert.runtime.onnx_export import check_onnx, export_onnx

    model = _pruned_tiny_model(0.9)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    assert check_onnx(model, path) < 1e-4  # batch and sequence differ from the export's


def test_bench_command_on_a_tiny_pruned_model(tmp_path, capsys):
    from obert.cli.main import main

    model = _pruned_tiny_model(0.9)
    model.save_pretrained(tmp_path / "m")
    threads = torch.get_num_threads()
    assert main(["bench", str(tmp_path / "m"), "--batch-size", "2", "--seq-len", "16",
                 "--rounds", "2", "--iters", "1", "--threads", "1", "--no-onnx", "--choose", "sparsity",
                 "--plot", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json")]) == 0
    assert torch.get_num_threads() == threads  # run_bench restores the caller's setting
    out = capsys.readouterr().out
    assert "| obert fp32 sparse |" in out and "| torch fp32 dense |" in out and "11 of 12" in out
    assert f"kernels: {kernels.isa()} (this CPU runs" in out or "PyTorch fallback" in out
    import json

    result = json.loads((tmp_path / "b.json").read_text())
    assert result["max_abs_diff"]["obert fp32 sparse"] < 1e-4 and (tmp_path / "b.png").is_file()
    assert main(["bench", str(tmp_path / "nothing"), "--no-onnx"]) == 2


def test_compile_default_thresholds_per_kernel():
    """60% sparse block4 layers: float32 keeps them dense (its kernel is slower than dense there),
    int8 block4 compiles them; an explicit min_sparsity applies to every layer."""
    from conftest import tiny_model

    from obert import find_targets
    from obert.runtime import compile

    def pruned_model():
        model = tiny_model("bert").eval()
        torch.manual_seed(2)
        for t in find_targets(model):
            w = t.module.weight.data
            w.mul_((torch.rand(w.shape[0], w.shape[1] // 4) >= 0.6).repeat_interleave(4, 1))
        return model

    assert compile(pruned_model(), choose="sparsity").sparse_layers == []
    int8 = compile(pruned_model(), dtype="int8", choose="sparsity")
    assert len(int8.sparse_layers) == 12 and int8.float32_layers == []
    assert len(compile(pruned_model(), min_sparsity=0.5, choose="sparsity").sparse_layers) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_layers_still_run_after_moving_to_cuda(dtype):
    # The kernels are CPU-only: on CUDA a compiled layer must run (densely, on the GPU), not
    # hand a device pointer to the CPU kernel.
    lin = pruned_linear(48, 64, 0.8, 4)
    sl = SparseLinear.from_linear(lin, dtype=dtype).cuda()
    x = torch.randn(5, 64)
    expected = SparseLinear.from_linear(lin, dtype=dtype)(x)
    y = sl(x.cuda())
    assert y.device.type == "cuda"
    tol = 1e-5 if dtype == "float32" else 0.05
    torch.testing.assert_close(y.cpu(), expected if dtype == "float32" else F.linear(x, lin.weight, lin.bias),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5, 16), (1, 2, 33, 33, 32), (2, 4, 70, 70, 64),
                                   (1, 2, 17, 40, 128), (2, 2, 40, 19, 48)])
@pytest.mark.parametrize("mask", ["none", "padding", "float"])
def test_attention_kernel_matches_float64_sdpa(shape, mask, threads, isa):
    batch, heads, q_len, k_len, dim = shape
    torch.manual_seed(q_len)
    # q, k, v as the model makes them: views of [batch, seq, heads * dim] projections
    q = torch.randn(batch, q_len, heads, dim).transpose(1, 2)
    k, v = (torch.randn(batch, k_len, heads, dim).transpose(1, 2) for _ in range(2))
    additive, sdpa_mask = None, None
    if mask == "padding":
        keep = torch.ones(batch, k_len, dtype=torch.bool)
        keep[0, k_len // 2:] = False
        additive = torch.zeros(batch, 1, k_len).masked_fill(~keep[:, None], float("-inf"))
        sdpa_mask = keep[:, None, None, :]
    elif mask == "float":
        additive = torch.randn(batch, q_len, k_len)
        sdpa_mask = additive[:, None].double()
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=sdpa_mask,
                                              scale=0.3).transpose(1, 2)
    with num_threads(threads):
        got = native(isa).attention(q, k, v, additive, 0.3, kernels.isa_index())
    assert got.shape == (batch, q_len, heads, dim) and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_kernel_masked_keys_weigh_exactly_zero_and_fully_masked_rows_are_zero(isa):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 32).transpose(1, 2) for _ in range(3))
    additive = torch.randn(2, 40, 40) * 3
    additive[:, :, 30:] = float("-inf")  # padding keys: must weigh 0, not 2^-126
    additive[:, :, 5] = -1e4  # Hugging Face style "large negative" mask values
    additive[1, 7] = float("-inf")  # every key masked for this query
    got = native(isa).attention(q, k, v, additive, 0.2, kernels.isa_index())
    assert torch.equal(got[1, 7], torch.zeros(3, 32))
    # Masked keys' values must not leak in: 3e38 there would show even at weight 2^-126 (~1e-38).
    v_poisoned = v.clone()
    v_poisoned[:, :, 30:] = 3e38
    torch.testing.assert_close(native(isa).attention(q, k, v_poisoned, additive, 0.2, kernels.isa_index()), got)
    keep = additive[:, None].double()
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep,
                                              scale=0.2).transpose(1, 2)
    rows = torch.ones(2, 40, dtype=torch.bool)
    rows[1, 7] = False
    torch.testing.assert_close(got[rows].double(), expected[rows], rtol=1e-5, atol=1e-5)


def test_attention_kernel_skips_keys_padded_on_either_side_for_every_query(isa):
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 70, 2, 16).transpose(1, 2) for _ in range(3))
    keep = torch.ones(3, 70, dtype=torch.bool)
    keep[0, :37] = False  # left padding past a 32-key block
    keep[0, 60:] = False
    keep[1, 33:] = False  # right padding: one key in the second block
    additive = torch.zeros(3, 1, 70).masked_fill(~keep[:, None], float("-inf"))
    got = native(isa).attention(q, k, v, additive, 0.25, kernels.isa_index())
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=keep[:, None, None, :], scale=0.25).transpose(1, 2)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    keep[2] = False  # no key at all: zero output
    additive = torch.zeros(3, 1, 70).masked_fill(~keep[:, None], float("-inf"))
    got = native(isa).attention(q, k, v, additive, 0.25, kernels.isa_index())
    assert torch.equal(got[2], torch.zeros(70, 2, 16))
    torch.testing.assert_close(got[:2].double(), expected[:2], rtol=1e-5, atol=1e-5)


def _attention_model(seed=0):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config).eval()


@needs_native
def test_compiled_model_runs_attention_on_the_kernel_and_keeps_it_after_load(tmp_path, monkeypatch):
    import copy

    from obert.runtime import attention, compile, load_compiled, save_compiled

    model = _attention_model()  # head dim 16: the kernel's smallest
    for name, p in model.named_parameters():
        if ".encoder." in name and p.dim() == 2:  # every encoder Linear weight, 80% pruned
            p.data.mul_(torch.rand_like(p) > 0.8)
    reference = copy.deepcopy(model)
    report = compile(model, choose="sparsity")
    assert report.fast_attention and model.config._attn_implementation == attention.NAME
    calls, ext = [], kernels.load()

    class Spy:  # the extension, counting attention calls
        def __getattr__(self, name):
            return getattr(ext, name)

        def attention(self, *args):
            calls.append(args[0].shape)
            return ext.attention(*args)

    monkeypatch.setattr(kernels, "load", lambda: Spy())
    ids = torch.randint(5, 40, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: the kernel takes the mask
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-5)
    assert len(calls) == 2  # one per layer, none fell back to SDPA
    monkeypatch.undo()
    save_compiled(model, tmp_path / "compiled")
    loaded = load_compiled(tmp_path / "compiled")
    assert loaded.config._attn_implementation == attention.NAME
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert not compile(copy.deepcopy(reference), attention=False, choose="sparsity").fast_attention


def test_attention_falls_back_to_sdpa_where_the_kernel_does_not_apply():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from obert.runtime.attention import attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    for dim, kwargs in [(8, {}), (32, {"dropout": 0.1}), (32, {"is_causal": True})]:
        q, k, v = (torch.randn(2, 2, 6, dim) for _ in range(3))
        torch.manual_seed(0)
        got, _ = attention_forward(module, q, k, v, None, **kwargs)
        torch.manual_seed(0)
        expected, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(got, expected)
    per_head = torch.zeros(2, 2, 6, 6, dtype=torch.bool)  # a mask per head: SDPA's job
    got, _ = attention_forward(module, q, k, v, ~per_head)
    torch.testing.assert_close(got, sdpa_attention_forward(module, q, k, v, ~per_head)[0])


@needs_native
@pytest.mark.parametrize("kind", ["padding", "per-query", "float padding"])
def test_attention_forward_takes_sdpa_style_masks(kind, monkeypatch):
    """Transformers hands over [B, 1, Sq, Sk] masks: a padding one (rows alike) reaches the kernel as
    one shared row, one that differs per query as it is; either way the output is SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from obert.runtime.attention import attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 20, 32) for _ in range(3))
    keep = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    keep[0, :, :, 13:] = False
    if kind == "per-query":
        keep[1] = torch.ones(20, 20, dtype=torch.bool).tril()
    mask = keep if kind != "float padding" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    ext, seen = kernels.load(), []

    class Spy:
        def attention(self, q, k, v, m, scale, isa):
            seen.append(m.shape)
            return ext.attention(q, k, v, m, scale, isa)

    monkeypatch.setattr(kernels, "load", lambda: Spy())
    got, _ = attention_forward(module, q, k, v, mask)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert seen == [(2, 20, 20) if kind == "per-query" else (2, 1, 20)]


@pytest.mark.parametrize("shape", [(1, 16), (5, 37), (70, 384), (33, 8)])
def test_add_layer_norm_kernel_matches_float64(shape, isa):
    x, r = torch.randn(shape) * 3 + 1, torch.randn(shape)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    expected = F.layer_norm((x + r).double(), (shape[1],), w.double(), b.double(), 1e-12)
    torch.testing.assert_close(native(isa).add_layer_norm(x, r, w, b, 1e-12, kernels.isa_index()).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_compile_fuses_residual_add_and_layer_norm():
    import copy

    from obert.runtime import compile
    from obert.runtime.norm import AddNorm

    model = _pruned_tiny_model(0.9)
    reference = copy.deepcopy(model)
    report = compile(model, choose="sparsity")
    assert report.fused_norms == [f"bert.encoder.layer.{i}.{part}" for i in range(2)
                                  for part in ("attention.output", "output")]
    block = model.bert.encoder.layer[0].attention.output
    assert isinstance(block, AddNorm) and not block.training
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    for n in ("bert.encoder.layer.0.output.LayerNorm.weight", "bert.encoder.layer.1.attention.output.LayerNorm.bias"):
        assert torch.equal(params[n], ref_params[n])  # same parameters under the same names
    ids = torch.randint(5, 30, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_model_runs_on_cuda(dtype):
    # Every runtime module (sparse layers, fused FFN, add + LayerNorm, attention) falls back to
    # ordinary GPU ops after .cuda() instead of calling the CPU kernels.
    import copy

    from obert.runtime import compile

    model = _attention_model()
    for name, p in model.named_parameters():
        if ".encoder." in name and p.dim() == 2:
            p.data.mul_((torch.rand(p.shape[0], p.shape[1] // 4) > 0.8).repeat_interleave(4, 1))
    reference = copy.deepcopy(model)
    report = compile(model, dtype=dtype, choose="sparsity")
    assert report.fused_ffn and report.fused_norms and report.fast_attention
    ids = torch.randint(5, 40, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        cpu = model(input_ids=ids, attention_mask=mask).logits
        gpu = model.cuda()(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
        dense = reference(input_ids=ids, attention_mask=mask).logits
    tol = 0.05 if dtype == "int8" else 1e-4  # int8 on the GPU: dequantised weights, float inputs
    torch.testing.assert_close(gpu, dense, rtol=tol, atol=tol)
    torch.testing.assert_close(cpu, dense, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_compiled_model_without_native_kernels_uses_the_pytorch_fallbacks(dtype, monkeypatch):
    # Where the extension cannot be built, every runtime module must still compute the same
    # function in PyTorch (CSR matmul, torch LayerNorm, SDPA).
    import copy

    from obert.runtime import compile

    model = _attention_model()
    for name, p in model.named_parameters():
        if ".encoder." in name and p.dim() == 2:
            p.data.mul_((torch.rand(p.shape[0], p.shape[1] // 4) > 0.8).repeat_interleave(4, 1))
    report = compile(model, dtype=dtype, choose="sparsity")
    assert report.fused_ffn and report.fused_norms and report.fast_attention
    ids = torch.randint(5, 40, (3, 60))  # 180 tokens: enough tiles for the fused FFN kernel
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.no_grad():
        native = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(kernels, "load", lambda: None)
        fallback = copy.deepcopy(model)(input_ids=ids, attention_mask=mask).logits
    tol = 2e-3 if dtype == "int8" else 1e-5  # int8: a rounding tie may fall the other way
    torch.testing.assert_close(fallback, native, rtol=tol, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 8, 3), (70, 132, 16), (130, 200, 33), (20, 1100, 24)])
def test_int8_smoothed_input_is_exact_quantised_arithmetic(shape, threads, isa):
    tokens, n_in, n_out = shape
    lin = pruned_linear(n_out, n_in, 0.6, 4, seed=tokens)
    smooth = torch.rand(n_in) * 8 + 0.05
    sl = SparseLinear.from_linear(lin, dtype="int8", smooth=smooth)
    torch.testing.assert_close(sl.in_mul, 1 / smooth)
    x = torch.randn(tokens, n_in)
    expected = _quantised_reference(x, lin, sl.in_mul)
    with num_threads(threads):
        got = sl(x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sl._fallback(x).double(), expected, rtol=1e-5, atol=1e-4)
    # The effective weight (what the CUDA path uses) is the layer's within half a grid step of
    # the scaled weight, scaled back: |W_eff - W|_nk <= s'_n / 2 * in_mul_k.
    bound = 0.5 * sl.w_scale[:, None] * sl.in_mul[None, :] * 1.0001 + 1e-7
    assert bool(((sl.to_dense_weight() - lin.weight).abs() <= bound).all())


def test_smoothing_an_outlier_channel_cuts_int8_error():
    """One input channel 40x larger than the rest sets every token's range: smoothing with the
    channel maxima (alpha 0.5) must bring the error well down (measured 3-4x lower)."""
    from obert.core.quantize import smoothing_factors

    lin = pruned_linear(64, 128, 0.5, 4, seed=9)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(256, 128, generator=g)
    x[:, 7] *= 40
    exact = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    s = smoothing_factors(x.abs().amax(0), lin.weight.abs().amax(0)).float()
    err = {name: float((SparseLinear.from_linear(lin, dtype="int8", smooth=sm)(x).double() - exact).pow(2).mean())
           for name, sm in {"plain": None, "smoothed": s}.items()}
    assert err["smoothed"] < 0.5 * err["plain"], err


def test_kernel_build_is_portable_and_shared_by_every_cpu(monkeypatch):
    """One build for every x86-64 CPU: the cache is not keyed by the CPU, nothing is compiled for
    the build machine (-march=native), and the per-instruction-set objects share no code the
    linker could merge (a weak symbol compiled for AVX-512 would be used by the AVX2 path)."""
    monkeypatch.setattr(kernels, "cpu_identity", lambda: ("EPYC", frozenset({"avx2", "fma", "avx512f"})))
    wide = kernels._build_dir()
    monkeypatch.setattr(kernels, "cpu_identity", lambda: ("EPYC", frozenset({"avx2", "fma"})))
    assert kernels._build_dir() == wide
    flags = [f for fl in kernels.ISA_FLAGS.values() for f in fl] + kernels._COMMON
    assert not [f for f in flags if f.startswith(("-march", "-mcpu", "-mtune"))]
    if not kernels.native_available() or shutil.which("nm") is None:
        pytest.skip("no native build or no nm here")
    ninja = (wide / "build.ninja").read_text()  # the glue's flags
    assert not re.search(r"-m(arch|cpu|tune)=native", ninja) and "-march" not in ninja
    objects = sorted(wide.glob("isa_*.o"))
    assert {o.stem for o in objects} >= {"isa_generic"}
    for obj in objects:
        out = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        weak = [line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] in (["W"], ["V"], ["u"])]
        assert set(weak) <= {"DW.ref.__gxx_personality_v0"}, (obj.name, weak[:5])


def _cpu_runs() -> list[str]:
    """The kernel sets this CPU runs, by /proc/cpuinfo (an independent check of the cpuid code)."""
    flags = kernels.cpu_identity()[1]
    runs = ["generic"]
    if {"avx2", "fma"} <= flags:
        runs.append("avx2")
        if "avx_vnni" in flags:
            runs.append("avxvnni")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            runs.append("avx512")
            if "avx512_vnni" in flags:
                runs.append("avx512_vnni")
    return runs


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo to compare with")
def test_dispatch_picks_the_best_path_this_cpu_has_and_obert_isa_forces_a_lower_one(monkeypatch):
    from obert.errors import ObertError

    if not kernels.native_available():
        pytest.skip("no native kernels")
    compiled = set(kernels.load().compiled_isas())
    expected = [name for name in _cpu_runs() if name in compiled]
    monkeypatch.delenv("OBERT_ISA", raising=False)
    assert kernels.available_isas() == expected
    assert kernels.isa() == expected[-1] and kernels.isa_index() == len(expected) - 1
    if platform.machine() == "x86_64":
        assert {"generic", "avx2", "avx512", "avx512_vnni"} <= compiled  # GCC/Clang of the last years
    for name in expected:
        monkeypatch.setenv("OBERT_ISA", name)
        assert kernels.isa() == name and kernels.available_isas()[kernels.isa_index()] == name
    for bad in ("avx1024", "AVX2"):
        monkeypatch.setenv("OBERT_ISA", bad)
        with pytest.raises(ObertError, match=f"OBERT_ISA={bad}: this CPU and build run generic"):
            kernels.isa()
    with pytest.raises(RuntimeError, match="no kernel set"):
        kernels.load().add_layer_norm(torch.ones(1, 16), torch.ones(1, 16), torch.ones(16),
                                      torch.ones(16), 1e-5, len(expected))


def _fake_timer(slow: str, calls: list):
    """A timer for compile's choice: layers whose shape/name matches ``slow`` lose to dense."""
    from obert.runtime.choose import Timing

    def timer(linear, sparse, tokens):
        calls.append((sparse.out_features, sparse.in_features, round(sparse.density, 2), tokens))
        loses = getattr(linear, "_tag", "") == slow
        return Timing(1.0, 2.0 if loses else 0.25, 0.5 if loses else 4.0)
    return timer


def test_compile_keeps_a_layer_dense_where_dense_torch_is_faster(tmp_path):
    import copy

    from obert.runtime import compile, load_compiled, save_compiled
    from obert.runtime.choose import Chooser

    model = _pruned_tiny_model(0.9)
    for name, m in model.named_modules():  # the FFN's first layers (a shape of their own: the
        if name.endswith("intermediate.dense"):  # timing of a shape and density is shared)
            m._tag = "slow"
    reference = copy.deepcopy(model)
    calls: list = []
    report = compile(model, chooser=Chooser(cache=False, timer=_fake_timer("slow", calls)))
    queries = [n for n in report.sparsity if n.endswith("intermediate.dense")]
    assert sorted(report.slower_layers) == sorted(queries) and len(queries) == 2
    assert set(report.sparse_layers).isdisjoint(queries) and len(report.sparse_layers) == 9
    for name in queries:  # still the model's own dense Linear
        assert type(model.get_submodule(name)) is torch.nn.Linear
    assert report.speedups[queries[0]] == 0.5
    assert "sparse kernel runs at 0.50x dense torch here" in report.why(queries[0])
    assert "below the sparsity threshold" in report.why("bert.encoder.layer.1.output.dense")
    table = report.layer_table()
    assert len(table.splitlines()) == 12 and "sparse (float32, 4.00x dense torch here)" in table
    assert "2 sparse enough but kept dense" in report.summary()
    assert f"on the {kernels.isa()} kernels" in report.summary() or not kernels.native_available()
    ids = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    save_compiled(model, tmp_path / "c")
    assert type(load_compiled(tmp_path / "c").get_submodule(queries[0])) is torch.nn.Linear


def test_compile_where_nothing_wins_stays_dense_says_so_and_still_saves(tmp_path):
    from obert.runtime import compile, load_compiled, save_compiled
    from obert.runtime.choose import Chooser

    model = _pruned_tiny_model(0.9)
    for m in model.modules():
        m._tag = "slow"
    report = compile(model, chooser=Chooser(cache=False, timer=_fake_timer("slow", [])))
    assert report.sparse_layers == [] and len(report.slower_layers) == 11
    assert "0 of 12 Linear layers run sparse" in report.summary()
    assert "model runs as fast as dense, not faster" in report.summary()
    save_compiled(model, tmp_path / "c")  # the fused norms and attention still apply
    assert load_compiled(tmp_path / "c") is not None


def test_compile_times_each_distinct_layer_once_and_caches_it_per_cpu(speed_cache):
    from obert.runtime import compile
    from obert.runtime.choose import Chooser

    calls: list = []
    timer = _fake_timer("slow", calls)
    compile(_pruned_tiny_model(0.9), chooser=Chooser(timer=timer))
    # Q, K, V, attention output share a shape; the densities of the random masks differ a little
    first = len(calls)
    assert 0 < first <= 11 and len(set(calls)) == first and all(c[3] == 256 for c in calls)
    assert speed_cache.is_file() and len(json.loads(speed_cache.read_text())) == first
    compile(_pruned_tiny_model(0.9), chooser=Chooser(timer=timer))
    assert len(calls) == first  # read back from this CPU's cache
    compile(_pruned_tiny_model(0.9), chooser=Chooser(tokens=64, timer=timer))
    assert len(calls) == 2 * first and calls[-1][3] == 64  # another token count: timed again
    speed_cache.write_text("{not json")  # a damaged cache is ignored and rewritten
    compile(_pruned_tiny_model(0.9), chooser=Chooser(timer=timer))
    assert len(calls) == 3 * first and len(json.loads(speed_cache.read_text())) == first


def test_speed_measurement_times_both_ways_on_this_cpu():
    from obert.runtime.choose import measure

    lin = pruned_linear(64, 128, 0.9, 1)
    timing = measure(lin, SparseLinear.from_linear(lin), tokens=32, rounds=2, iters=1)
    assert timing.dense_ms > 0 and timing.sparse_ms > 0 and timing.speedup > 0


def test_compile_without_native_kernels_says_the_fallback_is_slow(monkeypatch):
    from obert.runtime import compile

    monkeypatch.setattr(kernels, "load", lambda: None)
    report = compile(_pruned_tiny_model(0.9), choose="sparsity")
    assert report.kernels == "pytorch-fallback" and "PyTorch fallback (no native kernels here: slow)" in report.summary()
    with pytest.raises(Exception, match="choose must be one of speed, sparsity"):
        compile(_pruned_tiny_model(0.9), choose="fastest")


def test_int8_takes_dense_layers_only_on_the_native_kernels(monkeypatch):
    """int8 takes a dense layer (a dense weight is block4 too) where the native kernels run; on
    the PyTorch fallback only layers from 50% sparsity; float32 stays at 70%."""
    from obert import native as kernels
    from obert.runtime.compile import layer_kind

    torch.manual_seed(0)
    dense = torch.randn(8, 16)
    half = pruned_linear(8, 16, 0.5, 4, seed=1).weight.detach()
    assert 1.0 - float((half != 0).float().mean()) >= 0.5
    monkeypatch.setattr(kernels, "native_available", lambda: True)
    assert layer_kind(dense, "int8") == (True, True) and layer_kind(dense, "float32") == (False, False)
    monkeypatch.setattr(kernels, "native_available", lambda: False)
    assert layer_kind(dense, "int8") == (False, True) and layer_kind(half, "int8") == (True, True)
    assert layer_kind(dense, "int8", min_sparsity=0.0) == (True, True)
