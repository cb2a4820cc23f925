"""Sequence classification: loading classifiers (checked labels, new heads), evaluation, and the
task for training (``build_task``)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from obert.distributed import rank
from obert.errors import ObertError
from obert.model.loading import (CLASSIFIER, ENCODER, check_length, load_config, load_tokenizer,
                                 load_weights, require_kind)
from obert.tasks.base import Task, TaskInputs
from obert.tasks.data import (Encoded, generic_label_names, label_map_from_config, load_data,
                              training_labels)


def load_classifier(path: str, labels: list | None = None, *, tokenizer: str | None = None,
                    reinit_head: bool = False, log=print):
    """Tokenizer and sequence classifier from a hub id or local directory, checked first.

    Without ``labels`` the model must be a fine-tuned classifier (pruning, evaluation). With
    ``labels`` (sorted raw label values, at least two) for fine-tuning: a classifier whose labels
    are these keeps its head and its label ids; an encoder gets a new head (and ``log`` says so);
    a classifier of other labels is an error unless ``reinit_head``, which trains a new head.
    """
    from transformers import AutoModelForSequenceClassification


    config = load_config(path)
    kwargs: dict = {}
    fresh_head = False
    if labels is None:
        require_kind(config, path, (CLASSIFIER,), "this command",
                     hint=" (fine-tune an encoder first: obert finetune)")
    else:
        if len(labels) < 2:
            raise ObertError(f"the data has only one class ({labels[0]!r}): a classifier needs at "
                             "least two")
        kind = require_kind(config, path, (CLASSIFIER, ENCODER), "fine-tuning")
        kwargs = {"num_labels": len(labels), "id2label": {i: str(v) for i, v in enumerate(labels)},
                  "label2id": {str(v): i for i, v in enumerate(labels)}}
        have, want = set(config.label2id or {}), set(kwargs["label2id"])
        generic = generic_label_names(have)
        if kind == ENCODER:
            log(f"[obert] {path} is an encoder without a classification head: adding one for "
                f"{len(labels)} labels")
        elif reinit_head:
            fresh_head = True
            kwargs["ignore_mismatched_sizes"] = True
            log(f"[obert] replacing the classification head of {path} by a new one for "
                f"{len(labels)} labels")
        elif have == want:
            kwargs = {}  # the model's own label ids, so its head keeps its meaning
        elif not (generic and len(have) == len(want)):
            raise ObertError(f"'{path}' classifies {sorted(have)} but the data's labels are "
                             f"{sorted(want)}: pass --reinit-head (recipes: model.reinit_head: "
                             "true) to train a new head for them")
        else:  # LABEL_0..LABEL_n-1 name nothing: take the data's labels in id order
            log(f"[obert] {path} names its classes {sorted(have)}: taken to be the data's labels "
                f"{sorted(want)} in sorted order")
    tok = load_tokenizer(path, tokenizer, config)
    model = load_weights(AutoModelForSequenceClassification, path, **kwargs)
    if fresh_head:
        _reinit_head(model)
    return tok, model


def reorder_classes(model, label2id: dict) -> None:
    """Permute a classifier's output classes so that class ``name`` comes out at
    ``label2id[name]``: the rows of the head's last Linear (and the config's label maps)."""
    from torch import nn

    names = {str(k): int(v) for k, v in model.config.label2id.items()}
    order = [names[str(name)] for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    prefix = model.base_model_prefix + "."
    heads = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not n.startswith(prefix) and m.out_features == len(order)]
    if not heads:
        raise ObertError("cannot find the classifier's output layer to reorder its classes")
    with torch.no_grad():
        heads[-1].weight.copy_(heads[-1].weight[order])
        if heads[-1].bias is not None:
            heads[-1].bias.copy_(heads[-1].bias[order])
    model.config.label2id = {str(k): int(v) for k, v in label2id.items()}
    model.config.id2label = {int(v): str(k) for k, v in label2id.items()}


def _reinit_head(model) -> None:
    """Give ``model`` freshly initialised task-head weights (everything outside the encoder)."""
    fresh = type(model)(model.config)
    prefix = model.base_model_prefix + "."
    head = {k: v for k, v in fresh.state_dict().items() if not k.startswith(prefix)}
    model.load_state_dict(head, strict=False)


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int = 64, progress: bool = True) -> dict:
    """Accuracy and mean loss of ``model`` on ``data`` (batches ordered by length for speed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in tqdm(data.loader(batch_size, by_length=True), desc="evaluate", disable=not progress,
                      leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * len(batch["labels"])
        total += len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / total, "loss": loss_sum / total, "num_examples": total}


def build_task(inputs: TaskInputs) -> Task:
    """Sequence classification: labels from the data, a classifier (new head if asked), accuracy."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    d = inputs
    train_rows = load_data(d.train_file, d.data_task if d.train_file is None else None, "train")
    eval_rows = load_data(d.eval_file, d.data_task if d.eval_file is None else None, "eval")
    labels = training_labels(train_rows, eval_rows)
    tokenizer, model = load_classifier(d.model_path, labels, tokenizer=d.tokenizer,
                                       reinit_head=d.reinit_head, log=d.log)
    check_length(d.max_length, model.config, "training.max_length", tokenizer)
    label2id = label_map_from_config(model.config)
    train_ds = Encoded(train_rows.subset(d.max_train_rows, d.seed), tokenizer, label2id, d.max_length)
    eval_ds = Encoded(eval_rows.subset(d.max_eval_rows, d.seed), tokenizer, label2id, d.max_length)

    def load_teacher(path: str):
        require_kind(load_config(path, "teacher"), path, (CLASSIFIER,), "distillation.teacher")
        teacher = load_weights(AutoModelForSequenceClassification, path, "teacher")
        if teacher.config.num_labels != len(label2id):
            raise ObertError(f"teacher '{path}' predicts {teacher.config.num_labels} labels but the "
                             f"data has {len(label2id)}")
        names = {str(k): int(v) for k, v in (teacher.config.label2id or {}).items()}
        ours = {str(k): int(v) for k, v in label2id.items()}
        if generic_label_names(names) or names == ours:
            return teacher
        if set(names) == set(ours):  # the same classes in another order: line them up by name
            reorder_classes(teacher, ours)
            d.log(f"[obert] teacher's classes reordered by name to the data's label ids {ours}")
        elif all(isinstance(v, int) for v in labels):
            # Hub teachers name GLUE classes ("entailment", ...) where the data has ids 0..n-1.
            d.log(f"[obert] note: teacher labels {sorted(names, key=names.get)} are taken to be "
                   f"the data's labels {list(label2id)} in id order")
        else:
            raise ObertError(f"teacher '{path}' classifies {sorted(names)} but the data's labels "
                             f"are {sorted(ours)}")
        return teacher

    return Task("classification", "accuracy", tokenizer, model, train_ds,
                DataCollatorWithPadding(tokenizer),
                lambda m: evaluate(m, eval_ds, d.eval_batch_size, progress=d.progress and rank() == 0),
                load_teacher)
