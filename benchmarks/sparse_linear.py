"""Single pruned Linear layers: obert's sparse kernels vs dense ``F.linear``, same threads, same input.

    .venv/bin/python benchmarks/sparse_linear.py [--threads 1 2] [--tokens 128] [--rounds 7]

BERT-base FFN shapes (3072 x 768 and 768 x 3072, out x in), random weights pruned at random to
70/80/90/95/97% (unstructured, and block4 in float32 and int8), 128 tokens. Each round times dense
and every sparse variant back to back (median of a few calls each); the speed-up is the median of
the per-round ratios (this machine's timings drift 1.3-2.5x between runs; interleaving cancels
most of that). Also prints the sparse kernel's effective GFLOP/s (2 * tokens * non-zeros / time)
next to the dense GEMM's. Writes docs/sparse_linear_results.json and the table into
docs/benchmarks.md between ``<!-- sparse-linear:begin/end -->``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, log, replace_doc_block  # noqa: E402

SHAPES = [(3072, 768), (768, 3072)]
SPARSITIES = [0.7, 0.8, 0.9, 0.95, 0.97]
BEGIN, END = "<!-- sparse-linear:begin -->", "<!-- sparse-linear:end -->"


def pruned(n_out: int, n_in: int, sparsity: float, group: int, seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out).requires_grad_(False)
    keep = torch.rand(n_out, n_in // group, generator=g) >= sparsity
    lin.weight.mul_(keep.repeat_interleave(group, 1))
    return lin


def measure(n_out: int, n_in: int, sparsity: float, tokens: int, rounds: int, calls: int) -> dict:
    from obert.runtime import SparseLinear
    from obert.runtime.bench import _time

    x = torch.randn(tokens, n_in)
    unstructured = pruned(n_out, n_in, sparsity, 1)
    block = pruned(n_out, n_in, sparsity, 4)
    variants = {
        "fp32 unstructured": SparseLinear.from_linear(unstructured, group=1),
        "fp32 block4": SparseLinear.from_linear(block, group=4),
        "int8 block4": SparseLinear.from_linear(block, dtype="int8"),
    }
    dense_w, dense_b = unstructured.weight, unstructured.bias
    for m in variants.values():  # warm-up (and a check that the kernels agree with dense)
        m(x)
    torch.testing.assert_close(variants["fp32 unstructured"](x), F.linear(x, dense_w, dense_b),
                               rtol=1e-4, atol=1e-4)
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    dense_times, sparse_times = [], {k: [] for k in variants}
    for _ in range(rounds):
        t_dense = _time(lambda: F.linear(x, dense_w, dense_b), calls)
        dense_times.append(t_dense)
        for name, m in variants.items():
            t = _time(lambda: m(x), calls)
            sparse_times[name].append(t)
            ratios[name].append(t_dense / t)
    t_dense = statistics.median(dense_times)
    nnz = {name: m.nnz for name, m in variants.items()}
    return {
        "shape": [n_out, n_in], "sparsity": sparsity, "tokens": tokens,
        "dense_ms": 1e3 * t_dense, "dense_gflops": 2 * tokens * n_out * n_in / t_dense / 1e9,
        "speedup": {k: statistics.median(v) for k, v in ratios.items()},
        "sparse_ms": {k: 1e3 * statistics.median(v) for k, v in sparse_times.items()},
        "effective_gflops": {k: 2 * tokens * nnz[k] / statistics.median(sparse_times[k]) / 1e9
                             for k in variants},
    }


def table(results: list[dict], threads: int) -> str:
    rows = [r for r in results if r["threads"] == threads]
    lines = [f"{threads} thread{'s' if threads > 1 else ''}, {rows[0]['tokens']} tokens: speed-up over "
             "dense `F.linear` fp32 (sparse kernel's effective GFLOP/s in brackets; dense GEMM "
             f"{statistics.median(r['dense_gflops'] for r in rows):.0f} GFLOP/s)", "",
             "| shape (out x in) | sparsity | fp32 unstructured | fp32 block4 | int8 block4 |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['speedup'][k]:.2f}x ({r['effective_gflops'][k]:.0f})"
                 for k in ("fp32 unstructured", "fp32 block4", "int8 block4")]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {100 * r['sparsity']:.0f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES],
                    help="out x in, e.g. 1536x384 (other than the default: print only)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES,
                    help="(other than the default: print only)")
    ap.add_argument("--no-docs", action="store_true", help="print only")
    args = ap.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    args.no_docs |= shapes != SHAPES or args.sparsities != SPARSITIES
    from obert import native as kernels
    from obert.runtime.bench import cpu_info
    from obert.io import write_json

    if not kernels.native_available():
        sys.exit("the native kernels are not built here (run make setup)")
    info = cpu_info()
    log(f"{info['cpu']} ({', '.join(info['isa'])}), kernels {kernels.isa()}, torch {torch.__version__}")
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n_out, n_in in shapes:
            for sp in args.sparsities:
                r = measure(n_out, n_in, sp, args.tokens, args.rounds, args.calls)
                r["threads"] = threads
                results.append(r)
                log(f"{threads}t {n_out}x{n_in} {sp:.0%}: " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in r["speedup"].items()))
    text = "\n\n".join(table(results, t) for t in args.threads)
    print(text)
    if args.no_docs:
        return
    write_json(ROOT / "docs" / "sparse_linear_results.json",
               {"cpu": info, "kernels": kernels.isa(), "torch": torch.__version__, "command": " ".join(sys.argv), "results": results})
    replace_doc_block(BEGIN, END, text)


if __name__ == "__main__":
    main()
