"""What should ``--damp auto`` minimise? One oBERT estimate of the dense MiniLM (the one-shot
benchmark's: m=256 gradients of batch 16 at length 128, B=50, joint update, global), pruned at
several sparsities with each relative damping of a fine grid; for every candidate: validation
accuracy (the whole split), the task loss on 4, 16 and 64 held-out training mini-batches (what
``--damp auto`` scores by ``--auto-criterion loss``), and the KL divergence from the unpruned
model's predictions on the same (``--auto-criterion kl``).

    .venv/bin/python benchmarks/damp_study.py [--sparsities 0.6 0.7 0.8]

Writes docs/damp_study.json and prints, per criterion, how far its pick falls below the most
accurate candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, dense_minilm, log  # noqa: E402

GRID = [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0]


@torch.no_grad()
def outputs(model, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(per-example loss, log-probabilities) of ``model`` on each batch, dropout off."""
    model.eval()
    out = []
    for b in batches:
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
        logp = torch.log_softmax(logits, -1)
        out.append((torch.nn.functional.nll_loss(logp, b["labels"], reduction="none"), logp))
    return out


def main() -> None:
    from obert.io import write_json
    from obert.model.masks import MaskSet
    from obert.model.targets import find_targets
    from obert.pruning.driver import choose_pruned
    from obert.pruning.fisher import batch_stream, gradient_batches
    from obert.pruning.methods import OBert, PruneConfig
    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_map_from_config, load_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    ap.add_argument("--out", default=str(ROOT / "docs" / "damp_study.json"))
    args = ap.parse_args()
    dense_dir = dense_minilm(ROOT / "runs" / "bench" / "dense", log)
    tok, model = load_classifier(str(dense_dir))
    label2id = label_map_from_config(model.config)
    train = Encoded(load_file(DATA / "train.jsonl").subset(3000, seed=0), tok, label2id, 128)
    val = Encoded(load_file(DATA / "validation.jsonl"), tok, label2id, 128)
    loader = gradient_batches(train, 16)
    targets = find_targets(model)
    masks = MaskSet(targets)
    held = list(batch_stream(loader, 64, 104_729))  # the seed --damp auto uses at step 0, seed 0
    ref = outputs(model, held)
    base = PruneConfig(0.5, method="obert", damp="auto", num_grads=256, grad_batch_size=16)
    estimate = OBert(base).estimate(model, targets, masks, loader, seed=0, log=log)
    diag = torch.cat([(g.diagonal(dim1=-2, dim2=-1).mean(-1) / estimate.num_grads).cpu()
                      for g in estimate.grams.values()])
    log(f"mean Fisher diagonal per block: median {diag.median():.3g}, "
        f"quartiles {diag.quantile(0.25):.3g} / {diag.quantile(0.75):.3g}")
    saved = {t.name: t.module.weight.detach().clone() for t in targets}
    results = {"median_block_mean_diag": float(diag.median()), "runs": []}
    for s in args.sparsities:
        cfg = PruneConfig(s, method="obert", damp="auto", num_grads=256, grad_batch_size=16)
        method = OBert(cfg, estimate=estimate)
        method.trial = True
        for rel in GRID:
            method.use_damping(rel)
            method.update(targets, choose_pruned(method, model, targets, masks, loader, 0, s, cfg))
            got = outputs(model, held)
            losses = torch.cat([g[0] for g in got])
            kl = torch.cat([(r[1].exp() * (r[1] - g[1])).sum(-1) for r, g in zip(ref, got)])
            row = {"sparsity": s, "relative_damp": rel, "accuracy": evaluate(model, val)["accuracy"],
                   "loss4": float(losses[:64].mean()), "loss16": float(losses[:256].mean()),
                   "loss64": float(losses.mean()), "kl4": float(kl[:64].mean()),
                   "kl16": float(kl[:256].mean()), "kl64": float(kl.mean())}
            results["runs"].append(row)
            log(json.dumps(row))
            write_json(Path(args.out), results)
            with torch.no_grad():
                for t in targets:
                    t.module.weight.copy_(saved[t.name])
    for crit in ("loss4", "loss16", "loss64", "kl4", "kl16", "kl64"):
        gaps = []
        for s in args.sparsities:
            rows = [r for r in results["runs"] if r["sparsity"] == s]
            pick = min(rows, key=lambda r: r[crit])
            gaps.append(100 * (max(r["accuracy"] for r in rows) - pick["accuracy"]))
        log(f"{crit}: points below the best candidate per sparsity " + ", ".join(f"{g:.1f}" for g in gaps))


if __name__ == "__main__":
    main()
