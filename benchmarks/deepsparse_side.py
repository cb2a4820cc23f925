"""DeepSparse 1.8 side by side with obert's runtime on the same pruned model (optional reference).

    python3 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install deepsparse==1.8.0 "numpy<2" onnx
    .venv/bin/python benchmarks/deepsparse_side.py runs/minilm-mag90 --deepsparse-python /tmp/dsvenv/bin/python

DeepSparse is closed, evaluation-licensed and end-of-life: it is never a dependency of obert and
runs in its own virtual environment, as a child process that times its engine on request. Each
round times dense torch fp32, obert fp32 sparse (and int8 for block4 models) in this process and
then DeepSparse in the child, on the same inputs and thread count; speed-ups are medians of the
per-round ratios against dense torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD = r"""
import sys, time, statistics, numpy as np
from deepsparse import Engine
path, batch, seq, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = Engine(model=path, batch_size=batch, num_cores=cores, input_shapes=[[batch, seq], [batch, seq]])
rng = np.random.default_rng(0)
inputs = [rng.integers(5, 1000, (batch, seq)).astype(np.int64), np.ones((batch, seq), np.int64)]
engine(inputs)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine(inputs)
        times.append(time.perf_counter() - t0)
    print(statistics.median(times), flush=True)
"""


def export_legacy(model, path: Path, inputs: dict) -> Path:
    """ONNX for DeepSparse 1.8, which reads IR <= 9 and opsets <= 17: torch's TorchScript
    exporter at opset 17 with the benchmark's static shapes (obert's own export uses dynamo)."""
    from obert.runtime.onnx_export import _Logits

    torch.onnx.export(_Logits(model).eval(), (inputs["input_ids"], inputs["attention_mask"]),
                      str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--deepsparse-python", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    from obert.runtime import compile
    from obert.runtime.bench import _inputs, _time, load_model

    torch.set_num_threads(args.threads)
    dense = load_model(args.model)
    variants = {"torch fp32 dense": dense}
    fp32 = copy.deepcopy(dense)
    compile(fp32)
    variants["obert fp32 sparse"] = fp32
    int8 = copy.deepcopy(dense)
    compile(int8, dtype="int8")
    if any(getattr(m, "quantized", False) for m in int8.modules()):
        variants["obert int8 sparse"] = int8
    inputs = _inputs(dense, args.batch_size, args.seq_len)
    with tempfile.TemporaryDirectory(prefix="obert-ds-") as tmp:
        onnx_path = export_legacy(dense, Path(tmp) / "model.onnx", inputs)
        # Isolated (-I) and away from the checkout: run from the repository root, the child
        # failed to see the model file through DeepSparse's path resolution.
        child = subprocess.Popen([args.deepsparse_python, "-I", "-c", CHILD, str(onnx_path),
                                  str(args.batch_size), str(args.seq_len), str(args.threads)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp)
        for line in child.stdout:  # DeepSparse prints its own notes (e.g. NM_ARCH) to stdout
            if line.strip() == "ready":
                break
        else:
            sys.exit("DeepSparse could not compile the model (see its messages above)")
        ratios: dict[str, list[float]] = {k: [] for k in [*variants, "deepsparse 1.8"]}
        times: dict[str, list[float]] = {k: [] for k in ratios}
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, m in variants.items():
                    times[name].append(_time(lambda m=m: m(**inputs), args.iters))
                child.stdin.write(f"{args.iters}\n")
                child.stdin.flush()
                times["deepsparse 1.8"].append(float(child.stdout.readline()))
                for name in ratios:
                    ratios[name].append(times["torch fp32 dense"][-1] / times[name][-1])
        child.stdin.close()
        child.wait()
    import os

    from obert import native as kernels

    print(f"model {args.model}  batch {args.batch_size} x {args.seq_len}  threads {args.threads}  "
          f"obert kernels {kernels.isa()}  DeepSparse NM_ARCH={os.environ.get('NM_ARCH', '(its own choice)')}\n")
    print("| variant | ms / batch | sequences / s | speed-up vs torch fp32 dense |\n|---|---|---|---|")
    rows = {}
    for name in ratios:
        t = statistics.median(times[name])
        rows[name] = {"ms_per_batch": 1e3 * t, "sequences_per_s": args.batch_size / t,
                      "speedup": statistics.median(ratios[name])}
        print(f"| {name} | {1e3 * t:.1f} | {args.batch_size / t:.1f} | {rows[name]['speedup']:.2f}x |")
    print(json.dumps({"model": args.model, "threads": args.threads, "rows": rows, "kernels": kernels.isa(),
                      "nm_arch": os.environ.get("NM_ARCH"),
                      "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
