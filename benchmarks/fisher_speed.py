"""Fisher phase speed.

    .venv/bin/python benchmarks/fisher_speed.py --model [--rounds 3]      # the whole model
    .venv/bin/python benchmarks/fisher_speed.py [--layers 1] [--num-grads 256] [--rounds 3]

``--model``: the Fisher/score/update phase of one oBERT pruning step at 50% on the real inputs of
the one-shot benchmark (the dense MiniLM of ``benchmarks/one_shot.py``, m=256 gradients of batch
16 at length 128 from its 3,000 training rows, B=50, damp 1e-7, global), with the native batched
kernels (``obert.core.batched``) and with the PyTorch/LAPACK path, interleaved over rounds on the
same gradients (held in memory: 10.9 GB). Prints each phase per path, the median ratio, and the
phase against the SparseML reference's 150 s; writes the table into docs/benchmarks.md.

Without ``--model``: random gradients shaped like MiniLM's prunable weights (per encoder layer:
4 x 384x384 + 2 x 384x1536 = 1.77M weights), B=50, damp 1e-7; batched Gram + Cholesky against
WoodFisher's recursion (``woodbury_fisher_inverse``: 16 gradients per Woodbury step), interleaved;
prints each time, the median ratio and the largest relative difference between the two inverses.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from obert.core import batched
from obert.core.obs import (StreamingFisher, invert_fisher, prune_update, saliency,
                            woodbury_fisher_inverse)

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, log, replace_doc_block  # noqa: E402

REFERENCE_SECONDS = 150.0  # SparseML's Fisher phase of one step on these inputs (docs/benchmarks.md)
BEGIN, END = "<!-- fisher-phase:begin -->", "<!-- fisher-phase:end -->"


def model_gradients(num_grads: int, block: int) -> tuple[list, dict]:
    """The targets of the dense MiniLM and ``{name: [m, padded d] gradients}`` (float32)."""
    from obert.model.masks import MaskSet
    from obert.model.targets import find_targets
    from obert.pruning.fisher import batch_stream, gradient_batches, gradient_chunks, gradients_of, padded_size
    from obert.tasks.classification import load_classifier
    from obert.tasks.data import Encoded, label_map_from_config, load_file

    dense_dir = dense_minilm(ROOT / "runs" / "bench" / "dense", log)
    tok, model = load_classifier(str(dense_dir))
    ds = Encoded(load_file(DATA / "train.jsonl").subset(3000, seed=0), tok,
                 label_map_from_config(model.config), 128)
    targets = find_targets(model)
    masks = MaskSet(targets)
    sizes = [padded_size(t.numel, block) for t in targets]
    grads = {t.name: torch.empty(num_grads, s) for t, s in zip(targets, sizes)}
    times, row = {"grad_seconds": 0.0}, 0
    with gradients_of(model, targets):
        batches = batch_stream(gradient_batches(ds, 16), num_grads, 0)
        for rows in gradient_chunks(model, targets, masks, batches, list(range(len(targets))), sizes, 64,
                                    torch.float32, torch.device("cpu"), times):
            k = next(iter(rows.values())).shape[0]
            for i, g in rows.items():
                grads[targets[i].name][row:row + k] = g
            row += k
    log(f"{num_grads} gradients in {times['grad_seconds']:.0f} s")
    weights = {t.name: torch.nn.functional.pad(t.module.weight.detach().reshape(-1), (0, s - t.numel))
               for t, s in zip(targets, sizes)}
    return weights, grads


def fisher_phase(weights: dict, grads: dict, block: int, damp: float, joint: bool) -> dict:
    """One pruning step's Fisher/score/update phase at 50% (global): seconds per phase."""
    t0 = time.perf_counter()
    finv = {}
    for name, g in grads.items():
        gram = torch.zeros(g.shape[1] // block, block, block)
        for chunk in g.split(64):
            batched.accumulate_gram_lower(gram, chunk)
        finv[name] = invert_fisher(gram, g.shape[0], damp)
    t1 = time.perf_counter()
    scores = {n: saliency(weights[n], f) for n, f in finv.items()}
    flat = torch.cat(list(scores.values()))
    threshold = flat.kthvalue(flat.numel() // 2).values
    t2 = time.perf_counter()
    for n, f in finv.items():
        prune_update(weights[n], f, scores[n] <= threshold, joint=joint)
    t3 = time.perf_counter()
    return {"fisher": t1 - t0, "score": t2 - t1, "update": t3 - t2, "total": t3 - t0}


def torch_path():
    """The PyTorch/LAPACK path: the native kernels switched off for the block."""
    return mock.patch.object(batched, "_ext", lambda *tensors, **kw: None)


def run_model(args) -> None:
    from obert import native
    from obert.runtime.bench import cpu_info

    weights, grads = model_gradients(args.num_grads, args.block_size)
    rows = []
    for update in ("independent", "joint"):
        got = {"native": [], "torch": []}
        for r in range(args.rounds):
            for path in (("native", "torch") if r % 2 == 0 else ("torch", "native")):
                with torch_path() if path == "torch" else contextlib.nullcontext():
                    got[path].append(fisher_phase(weights, grads, args.block_size, 1e-7, update == "joint"))
                log(f"{update} round {r} {path}: " + ", ".join(f"{k} {v:.2f}s" for k, v in got[path][-1].items()))
        med = {p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in got.items()}
        ratio = statistics.median(t["total"] / n["total"] for t, n in zip(got["torch"], got["native"]))
        rows.append(f"| unstructured B={args.block_size}, {update} | {med['native']['fisher']:.2f} | "
                    f"{med['native']['score']:.2f} | {med['native']['update']:.2f} | "
                    f"**{med['native']['total']:.2f}** | {REFERENCE_SECONDS / med['native']['total']:.0f}x | "
                    f"{med['torch']['total']:.2f} | {ratio:.1f}x |")
    info = cpu_info()
    cpu = f"{info['cpu']} ({', '.join(info['isa'])})"
    table = "\n".join([
        f"Measured on {cpu} ({torch.get_num_threads()} threads; kernels: {native.isa()}), "
        f"`benchmarks/fisher_speed.py --model`, medians of {args.rounds} interleaved rounds:", "",
        "| one pruning step at 50% | Fisher accumulate+invert (s) | score (s) | update (s) | "
        "Fisher/score/update (s) | vs reference 150 s | PyTorch/LAPACK path (s) | native vs PyTorch |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    replace_doc_block(BEGIN, END, table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="store_true", help="the whole MiniLM step on real gradients")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--num-grads", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.model:
        run_model(args)
        return
    B, m = args.block_size, args.num_grads
    d = args.layers * (4 * 384 * 384 + 2 * 384 * 1536)
    d -= d % B
    torch.manual_seed(0)
    grads = torch.randn(m, d) * 1e-3
    ratios = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        acc = StreamingFisher(d, B, 1e-7)
        for chunk in grads.split(64):
            acc.update(chunk)
        t_gram = time.perf_counter() - t0
        ours = acc.inverse()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = woodbury_fisher_inverse(grads, B, 1e-7)
        t_ref = time.perf_counter() - t0
        ratios.append(t_ref / t_ours)
        err = float(((ours - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max())
        print(f"round {r}: gram+cholesky {t_ours:.2f}s (gram {t_gram:.2f}s)  woodbury {t_ref:.2f}s  "
              f"ratio {t_ref / t_ours:.1f}x  max rel diff {err:.1e}", flush=True)
        del ours, ref
    print(f"d={d:,} weights, m={m}, B={B}: median speed-up {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
