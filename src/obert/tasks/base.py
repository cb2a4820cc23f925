"""What a task gives the training loop, and what it is built from.

A task (classification, extractive question answering, ...) is one module with a ``build_task``
function that loads its data and model and returns a ``Task``: the tokenised training set, its
collator, the model, the headline metric, an evaluation and a teacher loader for distillation.
``obert.tasks.TASKS`` names them; recipes pick one with ``model.task_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskInputs:
    """Everything a task is built from (a recipe's model, data and training sections)."""

    model_path: str
    tokenizer: str | None  # another tokenizer when the model directory has none
    reinit_head: bool  # train a new head when the labels differ (classification)
    data_task: str | None  # a GLUE-style task name (hub) instead of files
    train_file: str | None
    eval_file: str | None
    max_train_rows: int | None
    max_eval_rows: int | None
    max_length: int
    doc_stride: int  # question answering: overlap of the windows over a long context
    seed: int
    eval_batch_size: int
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class Task:
    """What the trainer needs from a task: data, collator, model, evaluation, teacher loader."""

    kind: str
    metric: str  # the headline metric: accuracy or f1
    tokenizer: object
    model: torch.nn.Module
    train_dataset: object
    collator: Callable
    evaluate: Callable[[torch.nn.Module], dict]
    load_teacher: Callable[[str], torch.nn.Module]
