"""One-shot pruning benchmark: oBERT vs magnitude and the second-order family on MiniLM
fine-tuned on debian-sections.

    .venv/bin/python benchmarks/one_shot.py [--work runs/bench] [--only-plot]
    .venv/bin/python benchmarks/one_shot.py --groups family damp   # the method comparison

1. Dense fine-tune as the reference was: 3,000 train rows shuffled with seed 0, 2 epochs, AdamW
   at a constant lr 1e-4, batch 32, max length 128 (cached in WORK/dense).
2. One-shot, global, no fine-tuning after pruning, evaluated on the whole validation split:
   sparsity 30/50/60/70/80%, magnitude vs obert (joint and the paper's independent update),
   unstructured (B=50) and block4 (B=32), 1 and 4 recomputations; m=256 gradients of batch 16,
   damp 1e-7. With one recomputation every sparsity reuses the dense model's Fisher inverse
   (collected once per block size); the recomputation steps collect fresh gradients.
3. ``--groups family``: the same one-shot sweep (m=256, batch 16, damp 1e-7, unstructured) for
   WoodFisher (independent update), M-FAC with blocks of 2,000 and 10,000 weights (joint update)
   and oBERT, each with 1 and 4 recomputations; and N:M 2:4 at 50% (magnitude, oBERT R=1/4).
   ``--groups damp``: oBERT (unstructured, R=1, joint) with fixed dampings 1e-8..1e-4 and with
   ``--damp auto`` at every sparsity.
Results accumulate in docs/one_shot_results.json (a rerun skips what is done; the dense model's
weight hash is recorded so results from a different dense model are never mixed), then the
table goes to runs/one_shot_table.md (pasted into docs/benchmarks.md) and the plot to
docs/one_shot.png.
"""

from __future__ import annotations

import argparse
from itertools import groupby
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, exit_on_sigterm, guard_results, log, merge_results  # noqa: E402

SPARSITIES = [0.3, 0.5, 0.6, 0.7, 0.8]
REFERENCE = {0.5: (58.9, 62.5), 0.7: (24.9, 50.1), 0.8: (16.7, 41.7)}  # magnitude, SparseML oBERT


FIXED_DAMPS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4]
MFAC_BLOCKS = [2000, 10000]


def family_configs(recomputations: list[int]) -> list[dict]:
    """WoodFisher, M-FAC (two block sizes) and oBERT with the same gradients; N:M 2:4 at 50%."""
    out = []
    for s in SPARSITIES:
        for R in recomputations:
            out.append(dict(method="woodfisher", structure="unstructured", sparsity=s, R=R,
                            update="independent"))
            out += [dict(method="mfac", structure="unstructured", sparsity=s, R=R, update="joint",
                         block=b) for b in MFAC_BLOCKS]
    out.append(dict(method="magnitude", structure="2:4", sparsity=0.5, R=1, update="joint"))
    out += [dict(method="obert", structure="2:4", sparsity=0.5, R=R, update="joint")
            for R in recomputations]
    return out


def damp_configs() -> list[dict]:
    """Fixed dampings (1e-7 is the base run's), and --damp auto scoring candidates by the task
    loss and by the KL divergence from the unpruned model's predictions (4 batches each)."""
    out = [dict(method="obert", structure="unstructured", sparsity=s, R=1, update="joint", damp=d)
           for s in SPARSITIES for d in [*FIXED_DAMPS, "auto"] if d != 1e-7]
    for c in out:
        if c["damp"] == "auto":
            c["criterion"] = "loss"
    return out + [dict(method="obert", structure="unstructured", sparsity=s, R=1, update="joint",
                       damp="auto", criterion="kl") for s in SPARSITIES]


def method_name(c: dict) -> str:
    """``mfac-B<block>`` for M-FAC, the method otherwise: what ``--methods`` selects by."""
    return f"mfac-B{c['block']}" if c["method"] == "mfac" else c["method"]


def mfac_damp_configs() -> list[dict]:
    """M-FAC where it falls behind (70/80%): B=2000 at oBERT's best fixed damping on this model,
    1e-8, and both block sizes at 1e-6 (large blocks spanned by few gradients may want more)."""
    return [dict(method="mfac", structure="unstructured", sparsity=s, R=1, update="joint", block=b,
                 damp=d) for s in (0.7, 0.8) for b, d in ((2000, 1e-8), (2000, 1e-6), (10000, 1e-6))]


def configs(recomputations: list[int], groups: tuple[str, ...] = ("base",)) -> list[dict]:
    out = family_configs(recomputations) if "family" in groups else []
    out += mfac_damp_configs() if "mfacdamp" in groups else []
    out += damp_configs() if "damp" in groups else []
    if "base" not in groups:
        return out
    for structure in ("unstructured", "block4"):
        for s in SPARSITIES:
            out.append(dict(method="magnitude", structure=structure, sparsity=s, R=1, update="joint"))
            for R in recomputations:
                for update in ("independent", "joint"):
                    if R > 1 and update == "independent":
                        continue  # recomputation runs use the default (joint) update
                    out.append(dict(method="obert", structure=structure, sparsity=s, R=R, update=update))
    return out


def key(c: dict) -> str:
    extra = (f"-B{c['block']}" if "block" in c else "") + (f"-d{c['damp']}" if "damp" in c else "")
    extra += "-kl" if c.get("criterion") == "kl" else ""  # auto by the loss: the plain -dauto key
    return f"{c['method']}-{c['structure']}-{c['sparsity']}-R{c['R']}-{c['update']}{extra}"


def prune_config(c: dict, num_grads: int):
    """The PruneConfig of a benchmark config (m gradients of batch 16, damp 1e-7 unless set)."""
    from obert.pruning.methods import PruneConfig

    own = {}
    if c["method"] in ("obert", "woodfisher", "mfac"):
        own = {"num_grads": num_grads, "damp": c.get("damp", 1e-7), "update": c["update"]}
        if "block" in c:
            own["fisher_block_size"] = c["block"]
        if "criterion" in c:
            own["auto_criterion"] = c["criterion"]
    return PruneConfig(sparsity=c["sparsity"], method=c["method"], structure=c["structure"],
                       grad_batch_size=16, num_recomputations=c["R"], **own)


def main() -> None:
    exit_on_sigterm()
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="dense model cache")
    ap.add_argument("--results", default=str(ROOT / "docs" / "one_shot_results.json"))
    ap.add_argument("--num-grads", type=int, default=256)
    ap.add_argument("--recomputations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--groups", nargs="+", choices=["base", "family", "damp", "mfacdamp"], default=["base"],
                    help="base: oBERT vs magnitude; family: WoodFisher, M-FAC, N:M; damp: --damp auto")
    ap.add_argument("--structures", nargs="+", default=["unstructured", "block4", "2:4"],
                    help="run only the configurations of these structures")
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES,
                    help="run only the configurations at these sparsities")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="run only the configurations of these methods (M-FAC: mfac-B<block>)")
    ap.add_argument("--only-plot", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop starting new configs after this")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.only_plot:
        run(args, work, results, results_path)
    write_report(results, args)


def run(args, work: Path, results: dict, results_path: Path) -> None:
    from obert.tasks.data import Encoded, label_map_from_config, load_file
    from obert.training.oneshot import gradient_batches, prune_sweep
    from obert.tasks.classification import evaluate, load_classifier

    t_start = time.time()
    train_rows = load_file(DATA / "train.jsonl")
    val_rows = load_file(DATA / "validation.jsonl")
    dense_dir = dense_minilm(work / "dense", log)
    tok, dense = load_classifier(str(dense_dir))
    guard_results(results, dense, results_path, log)
    label2id = label_map_from_config(dense.config)
    val = Encoded(val_rows, tok, label2id, 128)
    grads_ds = Encoded(train_rows.subset(3000, seed=0), tok, label2id, 128)
    if "dense" not in results:
        merge_results(results_path, results, {"dense": evaluate(dense, val)})
    log(f"dense accuracy {results['dense']['accuracy']:.4f}")

    todo = [c for c in configs(args.recomputations, tuple(args.groups))
            if key(c) not in results and c["structure"] in args.structures
            and c["sparsity"] in args.sparsities
            and (args.methods is None or method_name(c) in args.methods)]
    # Cheapest first: magnitude, then obert reusing the dense Fisher, then recomputations
    # (each costs R-1 fresh gradient collections), the reference's sparsities first.
    priority = {0.8: 0, 0.7: 1, 0.5: 2, 0.6: 3, 0.3: 4}
    todo.sort(key=lambda c: (c["method"] != "magnitude", c["R"],
                             priority[c["sparsity"]] if c["R"] > 1 else 0, c["method"],
                             c["structure"], str(c.get("block")), str(c.get("damp")), c["sparsity"]))
    prune_configs = [prune_config(c, args.num_grads) for c in todo]
    sweep = prune_sweep(dense, prune_configs, lambda bs: gradient_batches(grads_ds, bs), log=log)
    t_prev = time.perf_counter()
    for c, (cfg, model, masks, report, fisher) in zip(todo, sweep):
        prune_seconds = time.perf_counter() - t_prev
        acc = evaluate(model, val)["accuracy"]
        merge_results(results_path, results, {key(c): {
            **c, "accuracy": acc, "global_sparsity": masks.stats()["global_sparsity"],
            "prune_seconds": prune_seconds, "timings": report.timings, "dense_fisher": fisher,
            "peak_rss_gib": report.peak_rss_gib, "steps": report.steps}})
        log(f"{key(c)}: accuracy {acc:.4f} sparsity {results[key(c)]['global_sparsity']:.4f} "
            f"({prune_seconds:.1f}s; {report.timings})")
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            log("time budget reached; rerun to continue")
            break
        t_prev = time.perf_counter()


def write_report(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "dense" not in results:
        print("no results yet")
        return
    dense = 100 * results["dense"]["accuracy"]
    rows = []
    cols = [("magnitude", 1, "joint", "magnitude"), ("obert", 1, "independent", "obert R=1 independent (paper)"),
            ("obert", 1, "joint", "obert R=1 joint"), ("obert", 4, "joint", "obert R=4 joint")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, structure in zip(axes, ("unstructured", "block4")):
        rows.append(f"\n**{structure}** (dense {dense:.1f}%)\n")
        header = "| sparsity | " + " | ".join(c[3] for c in cols)
        header += " | reference magnitude | reference oBERT |" if structure == "unstructured" else " |"
        rows.append(header)
        rows.append("|" + "---|" * (header.count("|") - 1))
        for s in SPARSITIES:
            cells = []
            for method, R, update, _ in cols:
                r = results.get(f"{method}-{structure}-{s}-R{R}-{update}")
                cells.append(f"{100 * r['accuracy']:.1f}" if r else "—")
            line = f"| {int(s * 100)}% | " + " | ".join(cells)
            if structure == "unstructured":
                ref = REFERENCE.get(s)
                line += f" | {ref[0]} | {ref[1]} |" if ref else " | — | — |"
            else:
                line += " |"
            rows.append(line)
        for method, R, update, label in cols:
            pts = [(s, results[k]["accuracy"] * 100) for s in SPARSITIES
                   if (k := f"{method}-{structure}-{s}-R{R}-{update}") in results]
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=label)
        if structure == "unstructured":
            ax.plot([s * 100 for s in REFERENCE], [v[1] for v in REFERENCE.values()], "k--",
                    marker="x", label="reference oBERT (SparseML)")
        ax.axhline(dense, color="gray", lw=0.8, ls=":", label="dense")
        ax.set_title(f"MiniLM one-shot, {structure}")
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    # The reference comparison is only written complete (a table of dashes would replace the
    # documented one while a rerun fills it).
    complete = all(f"{m}-{st}-{s}-R{R}-{u}" in results for m, R, u, _ in cols
                   for st in ("unstructured", "block4") for s in SPARSITIES)
    if complete:
        fig.savefig(ROOT / "docs" / "one_shot.png", dpi=110)
    family, damp = family_report(results), damp_report(results)
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    blocks = [("one-shot table", "\n".join(rows).strip())] if complete else []
    for name, body in (*blocks, ("family table", family), ("damp table", damp)):
        start = f"<!-- {name}: written by benchmarks/one_shot.py -->"
        end = f"<!-- end {name} -->"
        if start in text and end in text:
            text = text[:text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end):]
    doc.write_text(text)
    print("\n".join(rows) + "\n\n" + family + "\n\n" + damp)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}")


def _cell(results: dict, k: str) -> str:
    r = results.get(k)
    return f"{100 * r['accuracy']:.1f}" if r else "—"


def family_report(results: dict) -> str:
    """Accuracy per sparsity for every method of the family (unstructured), its plot, and N:M;
    R=1, and R=4 once any method has an R=4 result (whichever recomputations this run made)."""
    import matplotlib.pyplot as plt

    def columns(R: int) -> list[tuple[str, str]]:
        return [(f"WoodFisher R={R}", f"woodfisher-unstructured-{{s}}-R{R}-independent"),
                *[(f"M-FAC B={b} R={R}", f"mfac-unstructured-{{s}}-R{R}-joint-B{b}") for b in MFAC_BLOCKS],
                (f"oBERT R={R}", f"obert-unstructured-{{s}}-R{R}-joint")]

    cols = [("magnitude", "magnitude-unstructured-{s}-R1-joint"), *columns(1)]
    recomputations = [1, 4] if any(k.format(s=s) in results for _, k in columns(4) for s in SPARSITIES) else [1]
    cols += columns(4) if 4 in recomputations else []
    lines = ["| sparsity | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {int(s * 100)}% | " + " | ".join(_cell(results, k.format(s=s)) for _, k in cols) + " |"
              for s in SPARSITIES]
    nm = [("magnitude", "magnitude-2:4-0.5-R1-joint")] + \
        [(f"oBERT R={R}", f"obert-2:4-0.5-R{R}-joint") for R in recomputations]
    lines += ["", "2:4 at 50%: " + ", ".join(f"{label} {_cell(results, k)}%" if k in results else
                                            f"{label} not measured" for label, k in nm)]
    for (block, damp), runs in groupby(sorted(mfac_damp_configs(), key=lambda c: (c["block"], c["damp"])),
                                       key=lambda c: (c["block"], c["damp"])):
        found = [(c["sparsity"], key(c)) for c in runs]
        if any(k in results for _, k in found):
            lines += ["", f"M-FAC B={block} R=1 at damp {damp:g}: " +
                      ", ".join(f"{int(100 * s)}% {_cell(results, k)}" for s, k in found)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, k in cols:
        pts = [(100 * s, 100 * results[k.format(s=s)]["accuracy"]) for s in SPARSITIES
               if k.format(s=s) in results]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, lw=1, ls="--" if "R=4" in label else "-")
    if "dense" in results:
        ax.axhline(100 * results["dense"]["accuracy"], color="gray", ls=":", lw=0.8, label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("MiniLM one-shot, unstructured: the second-order family")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "one_shot_family.png", dpi=110)
    return "\n".join(lines)


def damp_report(results: dict) -> str:
    """oBERT R=1 accuracy per fixed damping and with --damp auto (and what it chose)."""
    def k(s, d):
        return f"obert-unstructured-{s}-R1-joint" + ("" if d == 1e-7 else f"-d{d}")

    def chosen(r):
        return ", ".join(f"{st['damping']:g}" for st in r.get("steps", []) if "damping" in st) if r else "—"

    lines = ["| sparsity | " + " | ".join(f"damp {d:g}" for d in FIXED_DAMPS)
             + " | best fixed | auto (KL) | its choice (x mean diag) | auto (loss) | its choice |",
             "|---" * (len(FIXED_DAMPS) + 6) + "|"]
    for s in SPARSITIES:
        fixed = [results.get(k(s, d)) for d in FIXED_DAMPS]
        best = max((100 * r["accuracy"] for r in fixed if r), default=None)
        kl, loss = k(s, "auto") + "-kl", k(s, "auto")
        cells = [_cell(results, k(s, d)) for d in FIXED_DAMPS]
        cells += [f"{best:.1f}" if best is not None else "—", _cell(results, kl), chosen(results.get(kl)),
                  _cell(results, loss), chosen(results.get(loss))]
        lines.append(f"| {int(s * 100)}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
