"""ONNX export of (pruned) Hugging Face encoders, checked against PyTorch in ONNX Runtime.

The model goes through ``torch.onnx.export`` (the torch.export-based exporter) inside a small
wrapper that takes positional ``input_ids``/``attention_mask`` and returns the logits (transformers
5 models take keyword arguments and return output objects). Batch and sequence length are
dynamic. ``check_onnx`` runs the file in ONNX Runtime on random tokens and compares with the
PyTorch model. Pruned weights export as ordinary (zero-filled) initialisers: ONNX Runtime runs
them dense, which is what ``obert bench`` measures as the "what users would run instead" baseline.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from obert.errors import ObertError, first_line


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


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
                                        output_names=["logits"],
                                        dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}))
        program.save(str(tmp))
    except ImportError as exc:
        raise ObertError(f"ONNX export needs onnx and onnxscript ({first_line(exc)})") from exc
    tmp.replace(path)
    return path


def check_onnx(model: nn.Module, path: str | Path, *, batch: int = 3, seq_len: int = 11,
               threads: int | None = None) -> float:
    """Max |ONNX Runtime - PyTorch| on random tokens (with some padding)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.randint(1, max(vocab - 1, 2), (batch, seq_len))
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0
    with torch.no_grad():
        ref = _Logits(model.eval())(ids, mask)
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float((torch.from_numpy(got) - ref).abs().max())
