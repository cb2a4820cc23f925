"""One-shot pruning of a fine-tuned classifier end to end: load, prune, evaluate, save."""

from __future__ import annotations

from pathlib import Path

from .data import Encoded, TextData, label_map_from_config
from .io import save_model_dir
from .methods import PruneConfig
from .prune import PruneReport, prune_model
from .targets import find_targets
from .train import evaluate, load_classifier, pick_device


def gradient_batches(data: Encoded, batch_size: int):
    """``seed -> iterator`` of shuffled training mini-batches, as the Fisher collection wants."""
    return lambda seed: iter(data.loader(batch_size, shuffle=True, seed=seed))


def sparsity_record(masks, config: PruneConfig, report: PruneReport, source: str) -> dict:
    """What ``sparsity.json`` holds: per-layer and global sparsity, method and settings."""
    return {**masks.stats(), "method": config.method, "structure": config.structure,
            "scope": config.scope, "source_model": source, "settings": config.as_dict(),
            "steps": report.steps, "timings": report.timings,
            "peak_rss_gib": report.peak_rss_gib}


def run_prune(model_path: str, config: PruneConfig, train_rows: TextData | None,
              eval_rows: TextData | None, *, out: str | Path, include=None, exclude=None,
              max_length: int = 128, eval_batch_size: int = 64, device: str | None = None) -> dict:
    """Prune ``model_path`` to ``config.sparsity`` and save it to ``out``; returns the summary."""
    tokenizer, model = load_classifier(model_path)
    model.to(pick_device(device))
    targets = find_targets(model, include, exclude)  # fails early if nothing is prunable
    label2id = label_map_from_config(model.config)
    train_ds = Encoded(train_rows, tokenizer, label2id, max_length) if train_rows else None
    eval_ds = Encoded(eval_rows, tokenizer, label2id, max_length) if eval_rows else None
    metrics: dict = {}
    if eval_ds is not None:
        metrics["accuracy_before"] = evaluate(model, eval_ds, eval_batch_size)["accuracy"]
    loaders = gradient_batches(train_ds, config.grad_batch_size) if train_ds is not None else None
    masks, report = prune_model(model, targets, config, loaders)
    if eval_ds is not None:
        metrics["accuracy_after"] = evaluate(model, eval_ds, eval_batch_size)["accuracy"]
    record = sparsity_record(masks, config, report, model_path)
    metrics.update(global_sparsity=record["global_sparsity"], timings=report.timings)
    save_model_dir(out, model, tokenizer, {"sparsity.json": record, "metrics.json": metrics})
    return metrics
