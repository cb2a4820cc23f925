"""ONNX export of (pruned) Hugging Face encoders, checked against PyTorch in ONNX Runtime.

The model goes through ``torch.onnx.export`` (the torch.export-based exporter) inside a small
wrapper that takes positional ``input_ids``/``attention_mask`` and returns the logits (transformers
5 models take keyword arguments and return output objects): ``start_logits`` and ``end_logits``
for a question-answering model, ``logits`` otherwise (a bare encoder's last hidden states). Batch and sequence length are
dynamic. ``check_onnx`` runs the file in ONNX Runtime on random tokens and compares with the
PyTorch model. Pruned weights export as ordinary (zero-filled) initialisers: ONNX Runtime runs
them dense, which is what ``obert bench`` measures as the "what users would run instead" baseline.

``export_qdq`` writes a quantisation-aware-trained model (weights on the int8 grid) in QDQ form:
each int8 layer's weight is stored as int8 with its per-row scales behind a
``DequantizeLinear`` (per axis), and its input is quantised per token exactly as the runtime's
kernels do (as float operations: standard ONNX quantisation is per tensor), so ONNX Runtime
computes what ``obert compile --dtype int8`` computes when its QDQ rewrites are off (session
option ``session.disable_quant_qdq = 1``; with them on, ONNX Runtime fuses the weights into its
own int8 matrix products, which quantise the inputs per tensor: close, but not the same function).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from obert.errors import ObertError, first_line


def output_names(model: nn.Module) -> list[str]:
    """The exported graph's outputs: a question-answering model's two logits, else one."""
    from obert.model.loading import QA, model_kind

    qa = model_kind(model.config) == QA or type(model).__name__.endswith("ForQuestionAnswering")
    return ["start_logits", "end_logits"] if qa else ["logits"]


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = output_names(model)

    def forward(self, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.names == ["logits"]:
            return (out.logits if hasattr(out, "logits") else out[0],)
        return tuple(getattr(out, n) for n in self.names)


def export_onnx(model: nn.Module, path: str | Path, *, seq_len: int = 16, batch: int = 2) -> Path:
    """Write ``model`` (eval mode, float32) to ``path`` as ONNX with dynamic batch and sequence."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.randint(1, max(vocab - 1, 2), (batch, seq_len))
    mask = torch.ones_like(ids)
    b, s = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
            program = torch.onnx.export(_Logits(model), (ids, mask), dynamo=True, verbose=False,
                                        input_names=["input_ids", "attention_mask"],
                                        output_names=output_names(model),
                                        dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
        program.save(str(tmp))
    except ImportError as exc:
        raise ObertError(f"ONNX export needs onnx and onnxscript ({first_line(exc)})") from exc
    tmp.replace(path)
    return path


def export_qdq(model: nn.Module, path: str | Path, layers: list[str], *, seq_len: int = 16,
               batch: int = 2) -> Path:
    """Write ``model`` with the Linear modules ``layers`` (weights on their per-row int8 grid)
    in QDQ form (module docstring); returns the path."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from obert.core.quantize import row_scales
    from obert.runtime.fake_quant import fake_quantize, remove

    modules = dict(model.named_modules())
    fake_quantize(model, layers, inputs=True, weights=False)
    try:
        export_onnx(model, path, seq_len=seq_len, batch=batch)
    finally:
        remove(model)
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    by_value: dict[tuple, list] = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.dtype == np.float32:
            by_value.setdefault(arr.shape, []).append((init, arr))
    nodes = []
    for name in layers:
        w = modules[name].weight.detach().float()
        s = row_scales(w)
        q = torch.round(w / s[:, None]).clamp(-127, 127)
        if not torch.equal(q * s[:, None], w):
            raise ObertError(f"{name}: the weights are not on their int8 grid (train with "
                             "quantisation first, or compile instead)")
        found = None
        for transposed, target in ((True, w.T), (False, w)):
            for init, arr in by_value.get(tuple(target.shape), []):
                if np.array_equal(arr, target.numpy()):
                    found = (init, transposed)
                    break
            if found:
                break
        if found is None:
            raise ObertError(f"{name}: its weight is not an initialiser of the exported graph")
        init, transposed = found
        levels = (q.T if transposed else q).to(torch.int8).contiguous().numpy()
        out = init.name
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(levels, f"{out}_int8"),
            numpy_helper.from_array(s.numpy().astype(np.float32), f"{out}_scale"),
            numpy_helper.from_array(np.zeros(s.numel(), dtype=np.int8), f"{out}_zero")])
        nodes.append(helper.make_node("DequantizeLinear", [f"{out}_int8", f"{out}_scale", f"{out}_zero"],
                                      [out], axis=1 if transposed else 0, name=f"{name}_dequantize"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    if all(o.domain not in ("", "ai.onnx") or o.version >= 13 for o in graph_model.opset_import):
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        onnx.save(graph_model, str(tmp))
        onnx.checker.check_model(str(tmp))
        tmp.replace(path)
    else:
        raise ObertError("the exported graph's opset is below 13 (per-axis DequantizeLinear)")
    return Path(path)


def check_onnx(model: nn.Module, path: str | Path, *, batch: int = 3, seq_len: int = 11,
               threads: int | None = None, int8_layers: list[str] | None = None) -> float:
    """Max |ONNX Runtime - PyTorch| over the outputs, on random tokens (with some padding);
    ``int8_layers``: the layers a QDQ export quantises (PyTorch then quantises their inputs as
    the kernels do)."""
    from obert.runtime.fake_quant import fake_quantize, remove

    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if int8_layers:  # the QDQ graph as written (ONNX Runtime's own int8 rewrites quantise otherwise)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.randint(1, max(vocab - 1, 2), (batch, seq_len))
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0
    fake_quantize(model, int8_layers or [], inputs=True, weights=False)
    try:
        with torch.no_grad():
            ref = _Logits(model.eval())(ids, mask)
    finally:
        remove(model)
    got = sess.run(output_names(model), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return max(float((torch.from_numpy(g) - r).abs().max()) for g, r in zip(got, ref))
