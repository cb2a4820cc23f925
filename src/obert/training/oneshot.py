"""One-shot pruning of a fine-tuned classifier end to end: load, prune, evaluate, save."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

from obert.tasks.data import Encoded, TextData, label_map_from_config
from obert.pruning.fisher import gradient_batches
from obert.card import model_card
from obert.io import save_model_dir
from obert.model.loading import check_length
from obert.model.masks import MaskSet, sparsity_record
from obert.pruning.methods import METHODS, PruneConfig
from obert.pruning.driver import PruneReport, prune_model
from obert.model.targets import find_targets
from obert.device import pick_device
from obert.tasks.classification import evaluate, load_classifier


def run_prune(model_path: str, config: PruneConfig, train_rows: TextData | None,
              eval_rows: TextData | None, *, out: str | Path, include=None, exclude=None,
              max_length: int | None = None, eval_batch_size: int = 64, device: str | None = None,
              tokenizer: str | None = None, overwrite: bool = False) -> dict:
    """Prune ``model_path`` to ``config.sparsity`` and save it to ``out``; returns the summary.

    ``max_length``: tokens per example (None: 128, or the model's limit when shorter).
    ``tokenizer`` names another tokenizer when the model directory has none; an earlier obert
    output at ``out`` is replaced only with ``overwrite``.
    """
    tokenizer, model = load_classifier(model_path, tokenizer=tokenizer)
    max_length = check_length(max_length, model.config, "--max-length", tokenizer)
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
    record = sparsity_record(masks, method=config.method, structure=config.structure,
                             scope=config.scope, source=model_path, settings=config.as_dict(),
                             steps=report.steps, timings=report.timings,
                             peak_rss_gib=report.peak_rss_gib)
    metrics.update(global_sparsity=record["global_sparsity"], timings=report.timings)
    card = model_card(f"{Path(out).name}: {config.method} one-shot to {config.sparsity:.0%}",
                      what=[f"one-shot {config.method} pruning ({config.structure}, {config.scope} "
                            f"threshold, {config.num_recomputations} step(s)) to sparsity "
                            f"{config.sparsity}: `obert prune` with settings {config.as_dict()}"],
                      source=model_path, sparsity=record, metrics=metrics)
    save_model_dir(out, model, tokenizer, {"sparsity.json": record, "metrics.json": metrics,
                                           "README.md": card}, overwrite=overwrite)
    return metrics


def prune_sweep(dense, configs: list[PruneConfig], loader_factory, *, include=None, exclude=None,
                log=print) -> Iterator[tuple[PruneConfig, object, object, PruneReport, dict]]:
    """Prune copies of ``dense`` with each config; yields ``(config, model, masks, report, info)``.

    The first step of every config starts from the dense model, so a method's estimate (oBERT:
    the Fisher inverse) is made once per (method, its settings, batch size, seed) and shared;
    ``info`` holds that estimate's timings. Later recomputation steps estimate afresh as usual.
    An estimate is closed after the last config that uses it (M-FAC's hold gigabytes on disk).
    """
    firsts = [METHODS[c.method](c) for c in configs]
    keys = [json.dumps([c.method, f.estimate_key(), c.grad_batch_size, c.seed])
            for c, f in zip(configs, firsts)]
    last = {key: i for i, key in enumerate(keys)}
    cache: dict[str, object] = {}
    for i, (config, first, key) in enumerate(zip(configs, firsts, keys)):
        model = copy.deepcopy(dense)
        targets = find_targets(model, include, exclude)
        if key not in cache:
            dense_targets = find_targets(dense, include, exclude)
            loaders = loader_factory(config.grad_batch_size)
            cache[key] = first.estimate(
                dense, dense_targets, MaskSet.from_zeros(dense_targets), loaders, config.seed,
                log=log)
        estimate = cache[key]
        method = METHODS[config.method](config, estimate) if estimate is not None else first
        masks, report = prune_model(model, targets, config,
                                    loader_factory(config.grad_batch_size), method=method,
                                    log=lambda s: None)
        yield config, model, masks, report, estimate.timings() if estimate is not None else {}
        if last[key] == i and estimate is not None:
            estimate.close()
            del cache[key]
