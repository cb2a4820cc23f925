"""``obert bench``: like-for-like speed of a pruned model, dense vs sparse, on this CPU.

Same model, batch size, sequence length and thread count for every variant:

* ``torch fp32 dense``: the pruned model as PyTorch runs it (zeros included): the baseline.
* ``obert fp32 sparse``: ``obert.runtime.compile`` (sparse Linear layers on the native kernels
  where they beat dense torch on this CPU; the path and every layer's choice are reported).
* ``obert int8 sparse``: the same with block4 layers quantised (only when the model is block4).
* ``onnxruntime fp32`` / ``onnxruntime int8 dynamic``: what users would run instead, measured in a
  separate process (two runtimes in one process fight over threads).

The torch variants are timed in interleaved rounds and the speed-up is the median of per-round
ratios (this machine's timings drift between runs; interleaving cancels most of it).
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from obert.errors import ObertError
from obert.runtime.choose import median_time as _time


def cpu_info() -> dict:
    """CPU model and the vector ISA extensions the kernels can use."""
    from obert.native import cpu_identity

    model, flags = cpu_identity()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp")
           if f in flags]
    return {"cpu": model, "machine": platform.machine(), "isa": isa}


def load_model(path: str):
    """A sequence classifier, an extractive question-answering model, or a bare encoder
    (pre-training heads are left out), in eval mode."""
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from obert.model.loading import CLASSIFIER, ENCODER, QA, load_config, load_weights, require_kind

    from obert.runtime.compile import RUNTIME_FILE

    if (Path(path) / RUNTIME_FILE).is_file():
        raise ObertError(f"'{path}' is a compiled obert model (load it with obert.runtime."
                         "load_compiled); give the pruned model it was compiled from")
    kind = require_kind(load_config(path), path, (CLASSIFIER, QA, ENCODER), "the sparse runtime")
    cls = {CLASSIFIER: AutoModelForSequenceClassification, QA: AutoModelForQuestionAnswering}.get(
        kind, AutoModel)
    return load_weights(cls, path).float().eval()


def activation_bytes(config, batch: int, seq_len: int) -> int:
    """Rough peak bytes of one float32 forward: a few hidden-size buffers, the feed-forward
    activations and one layer's attention scores (all variants hold theirs at once, ~4x)."""
    hidden = getattr(config, "hidden_size", getattr(config, "dim", 768))
    ffn = getattr(config, "intermediate_size", getattr(config, "hidden_dim", 4 * hidden))
    heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", 12))
    tokens = batch * seq_len
    return 4 * 4 * (tokens * (4 * hidden + ffn) + batch * heads * seq_len * seq_len)


def check_memory(config, batch: int, seq_len: int) -> None:
    """One-line error before timing when the batch cannot fit in the memory available."""
    import psutil

    need, have = activation_bytes(config, batch, seq_len), psutil.virtual_memory().available
    if need > have:
        raise ObertError(f"batch {batch} x {seq_len} tokens needs about {need / 2**30:.1f} GiB of "
                         f"activations, {have / 2**30:.1f} GiB is free: lower --batch-size")


def _inputs(model, batch: int, seq_len: int, seed: int = 0) -> dict:
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(vocab - 1, 6), (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _output(model, inputs):
    """The logits (a QA model's start and end logits stacked on a last axis of 2), or the last
    hidden states."""
    out = model(**inputs)
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def interleaved(models: dict, inputs: dict, *, rounds: int, iters: int, log=None) -> dict:
    """Time each model (the first is the baseline) on ``inputs`` in ``rounds`` interleaved rounds
    of ``iters`` calls; per model: median ms per batch, sequences per second, and the median of
    the per-round speed-ups over the baseline (rounds cancel the machine's drift)."""
    seconds = {name: [] for name in models}
    for r in range(rounds):
        for name, m in models.items():
            seconds[name].append(_time(lambda m=m: m(**inputs), iters))
        if log is not None:
            base = seconds[next(iter(models))][-1]
            log(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {base / ts[-1]:.2f}x" for n, ts in list(seconds.items())[1:]))
    base = seconds[next(iter(models))]
    batch = len(next(iter(inputs.values())))
    return {name: {"ms_per_batch": 1e3 * statistics.median(ts),
                   "sequences_per_s": batch / statistics.median(ts),
                   "speedup": statistics.median(b / t for b, t in zip(base, ts))}
            for name, ts in seconds.items()}


@torch.no_grad()
def bench_torch(model, *, batch: int, seq_len: int, rounds: int, iters: int,
                int8: bool | None = None, min_sparsity: float | None = None,
                choose: str = "speed") -> dict:
    """Dense vs compiled sparse (fp32, and int8 when block4) in interleaved rounds."""
    from obert import native as kernels
    from obert.runtime import compile
    from obert.runtime.compile import int8_layers

    inputs = _inputs(model, batch, seq_len)
    variants = {"torch fp32 dense": model}
    sparse = copy.deepcopy(model)
    report = compile(sparse, min_sparsity=min_sparsity, choose=choose)
    variants["obert fp32 sparse"] = sparse
    reports = {"obert fp32 sparse": report.as_dict()}
    ref = _output(model, inputs)
    errors = {"obert fp32 sparse": float((_output(sparse, inputs) - ref).abs().max())}
    block4 = bool(int8_layers(model))  # compile(dtype="int8") would quantise some layer
    if int8 or (int8 is None and block4):
        q = copy.deepcopy(model)
        reports["obert int8 sparse"] = compile(q, min_sparsity=min_sparsity, dtype="int8",
                                               choose=choose).as_dict()
        variants["obert int8 sparse"] = q
        out = _output(q, inputs)
        errors["obert int8 sparse"] = float((out - ref).abs().max())
        if out.dim() == 2:
            errors["obert int8 sparse argmax agreement"] = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    rows = interleaved(variants, inputs, rounds=rounds, iters=iters)
    return {"rows": rows, "compile": reports, "max_abs_diff": errors,
            "native_kernels": kernels.native_available(), "kernels": kernels.isa(),
            "kernel_paths": kernels.available_isas()}


def bench_onnxruntime(model_dir: str, *, batch: int, seq_len: int, threads: int, iters: int,
                      rounds: int) -> dict:
    """ONNX Runtime fp32 and int8 dynamic of the same model, in a child process."""
    proc = subprocess.run(isolated_python("obert.runtime.bench", model_dir, str(batch), str(seq_len),
                                          str(threads), str(iters), str(rounds)),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isolated_python(module: str, *args: str) -> list[str]:
    """Command running ``python -m module args`` isolated (``-I``): nothing from the working
    directory, ``PYTHONPATH`` or user site-packages is imported; only obert's own location is put
    on the path (it may be a source checkout rather than an installed package)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the obert package
    boot = f"import runpy, sys; sys.path.insert(0, {root!r}); " \
           f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-I", "-c", boot, *args]


def _ort_child(model_dir: str, batch: int, seq_len: int, threads: int, iters: int, rounds: int) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from obert.runtime.onnx_export import export_onnx

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    inputs = {k: v.numpy() for k, v in _inputs(model, batch, seq_len).items()}
    out = {}
    with tempfile.TemporaryDirectory(prefix="obert-ort-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx")
        int8 = Path(tmp) / "model-int8.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sessions = {"onnxruntime fp32": ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"]),
                    "onnxruntime int8 dynamic": ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])}
        times = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                times[name].append(_time(lambda s=s: s.run(None, inputs), iters))
    for name, ts in times.items():
        out[name] = {"ms_per_batch": 1e3 * statistics.median(ts), "sequences_per_s": batch / statistics.median(ts)}
    return out


def run_bench(model_dir: str, *, batch: int = 16, seq_len: int | None = None,
              threads: int | None = None, rounds: int = 5, iters: int = 3, onnx: bool = True,
              int8: bool | None = None, min_sparsity: float | None = None,
              choose: str = "speed") -> dict:
    """Everything ``obert bench`` prints, as a dict. ``seq_len``: tokens per sequence (None:
    128, or the model's limit when shorter; longer than the limit is an error)."""
    from obert.model.loading import check_length

    threads = threads or torch.get_num_threads()
    model = load_model(model_dir)
    seq_len = check_length(seq_len, model.config, "--seq-len")
    check_memory(model.config, batch, seq_len)
    result = {"model": model_dir, "batch": batch, "seq_len": seq_len, "threads": threads,
              "torch": torch.__version__, **cpu_info()}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result.update(bench_torch(model, batch=batch, seq_len=seq_len, rounds=rounds, iters=iters,
                                  int8=int8, min_sparsity=min_sparsity, choose=choose))
    finally:  # the caller's thread count, as it was
        torch.set_num_threads(before)
    if onnx:
        ort_rows = bench_onnxruntime(model_dir, batch=batch, seq_len=seq_len, threads=threads,
                                     iters=iters, rounds=rounds)
        if "error" in ort_rows:
            result["onnxruntime_error"] = ort_rows["error"]
        else:
            base = result["rows"]["torch fp32 dense"]["ms_per_batch"]
            for name, row in ort_rows.items():
                # Different process: a ratio of medians, not a median of interleaved ratios.
                result["rows"][name] = {**row, "speedup": base / row["ms_per_batch"]}
    return result


def format_table(result: dict) -> str:
    lines = [f"model {result['model']}  batch {result['batch']} x {result['seq_len']} tokens  "
             f"threads {result['threads']}",
             f"cpu {result['cpu']} ({result['machine']}; {' '.join(result['isa']) or 'no SIMD flags read'}); "
             f"torch {result['torch']}; kernels: "
             + (f"{result['kernels']} (this CPU runs {', '.join(result['kernel_paths'])}; "
                "OBERT_ISA picks another)" if result["native_kernels"]
                else "none native here, PyTorch fallback (slow: layers stay dense where it loses)")]
    for name, rep in result["compile"].items():
        slower = f", {len(rep['slower_layers'])} kept dense (faster here)" if rep["slower_layers"] else ""
        lines.append(f"{name}: {len(rep['sparse_layers'])} of "
                     f"{len(rep['sparse_layers']) + len(rep['dense_layers'])} Linear layers sparse "
                     f"({100 * rep['sparse_fraction']:.1f}% of Linear work{slower}), "
                     f"max |diff| vs dense {result['max_abs_diff'][name]:.2e}; fused: "
                     f"{len(rep['fused_ffn'])} FFN blocks, {len(rep['fused_norms'])} add+LayerNorm, "
                     f"attention {'obert' if rep['fast_attention'] else 'torch SDPA'}")
    lines += ["", "| variant | ms / batch | sequences / s | speed-up vs torch fp32 dense |",
              "|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['ms_per_batch']:.1f} | {row['sequences_per_s']:.1f} | "
                     f"{row['speedup']:.2f}x |")
    if "onnxruntime_error" in result:
        lines.append(f"(onnxruntime not measured: {result['onnxruntime_error']})")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """Throughput of every variant as a bar chart."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry

    names = list(result["rows"])
    fig = Figure(figsize=(8, 0.6 * len(names) + 1.5))
    ax = fig.subplots()
    ax.barh(names, [result["rows"][n]["sequences_per_s"] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("sequences / s")
    ax.set_title(f"{Path(result['model']).name}: batch {result['batch']} x {result['seq_len']}, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # the ONNX Runtime child of bench_onnxruntime
    a = sys.argv[1:]
    print(json.dumps(_ort_child(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]))))
