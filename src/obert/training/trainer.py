"""A ``transformers.Trainer`` with knowledge distillation and learning-rate rewinding.

``ObertTrainer(teacher=..., hardness=..., temperature=..., kd_positions=...)`` replaces the task
loss by ``obert.training.distill.distillation_loss`` (masked LM: over every real token, or over
the masked ones with ``kd_positions="masked"``); ``lr_schedule=LRSchedule(...)`` replaces the Trainer's
scheduler by ``obert.training.schedule.lr_factor`` with restarts at the pruning steps. Everything else
(devices, DDP, mixed precision, checkpoints) is the stock Trainer, except that the task loss
is taken as the per-batch mean it is (see ``__init__``): use this class rather than the plain
Trainer for pruning on several processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import Trainer

from obert.model.heads import labelled_positions_only
from obert.training.distill import distillation_loss, masked_token_distillation_loss
from obert.training.schedule import LRFactor, PruningSchedule, steps_per_epoch


@dataclass(frozen=True)
class LRSchedule:
    """``mode``: rewind, linear or constant; restarts come from the pruning schedule."""

    mode: str = "rewind"
    final_ratio: float = 0.1
    pruning: PruningSchedule | None = None


class ObertTrainer(Trainer):
    def __init__(self, *args, teacher: torch.nn.Module | None = None, hardness: float = 1.0,
                 temperature: float = 2.0, lr_schedule: LRSchedule | None = None,
                 kd_positions: str = "all", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Encoder task heads (sequence classification, QA) return a per-batch mean loss and ignore
        # ``num_items_in_batch``; the stock Trainer still multiplies their loss by the number of
        # processes when their ``forward`` takes ``**kwargs``, making DDP gradients world_size
        # times too large (it changes clipping and Adam's epsilon). Treat the loss as what it is.
        self.model_accepts_loss_kwargs = False
        if teacher is not None:
            teacher.to(self.args.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.teacher = teacher
        self.hardness = hardness
        self.temperature = temperature
        self.lr_schedule = lr_schedule
        self.kd_positions = kd_positions

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or self.hardness <= 0:
            # The loss alone (training) needs a masked-LM head only at the masked tokens; the
            # outputs returned for evaluation keep every position.
            with labelled_positions_only(model) if not return_outputs else contextlib.nullcontext():
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
        if self.kd_positions == "masked":  # masked LM: both heads at the masked tokens only
            with labelled_positions_only(model):
                outputs = model(**inputs)
            with torch.no_grad(), labelled_positions_only(self.teacher):
                teacher_out = self.teacher(**inputs)
            loss = masked_token_distillation_loss(outputs.get("loss"), outputs.logits, teacher_out.logits,
                                                  inputs["labels"], self.hardness, self.temperature)
            return (loss, outputs) if return_outputs else loss
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_out = self.teacher(**{k: v for k, v in inputs.items()
                                          if k not in ("labels", "start_positions", "end_positions")})
        loss = distillation_loss(outputs.get("loss"), outputs, teacher_out, self.hardness,
                                 self.temperature, inputs.get("attention_mask"))
        return (loss, outputs) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            s = self.lr_schedule
            spe = steps_per_epoch(num_training_steps, self.args.num_train_epochs)
            restarts = [step for step, _ in s.pruning.steps(spe)] if s.pruning else []
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer,
                LRFactor(num_training_steps, restarts, s.mode, s.final_ratio))
            self._created_lr_scheduler = True
        return self.lr_scheduler


__all__ = ["LRSchedule", "ObertTrainer"]
