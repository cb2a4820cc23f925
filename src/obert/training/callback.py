"""oBERT gradual pruning as a ``transformers.TrainerCallback``: add it to any ``Trainer``.

    callback = OBertPruningCallback(PruningSchedule(0.7, 0.9, 2, 26, 4), PruneConfig(0.9),
                                    train_dataset, data_collator)
    trainer = Trainer(..., callbacks=[callback])

Before optimizer step ``t_k`` of the schedule, the callback collects fresh gradients, re-estimates
the Fisher, prunes to ``s_k`` with the OBS update (masks only grow) and zeroes the optimizer
state of pruned weights. Masks hold pruned gradients at zero (tensor hooks) and pruned weights
at exactly zero after every optimizer step (AdamW's weight decay and momentum included).

Several processes (``torchrun``/``accelerate launch``): every rank runs the same pruning step;
the Fisher's m gradients are dealt across ranks and their Gram sums all-reduced (see
``collect_fisher``), then rank 0's masks and pruned weights are broadcast so every replica
stays identical. Steps per epoch are the optimizer steps per epoch of one process (what the
Trainer counts), whatever the number of processes.

Checkpoints: ``on_save`` writes the masks and pruning history into the Trainer's checkpoint
folder; ``load_checkpoint(folder)`` before ``trainer.train(resume_from_checkpoint=folder)``
restores them (without it, masks are rebuilt from the zeros of the resumed weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from obert.distributed import broadcast, rank
from obert.errors import ObertError
from obert.io import write_json
from obert.model.masks import MaskSet
from obert.pruning.methods import METHODS, PruneConfig
from obert.pruning.driver import prune_model
from obert.training.schedule import PruningSchedule, steps_per_epoch
from obert.model.targets import find_targets

MASKS_FILE = "obert_masks.safetensors"
STATE_FILE = "obert_pruning.json"
METHOD_FILE = "obert_method.safetensors"  # what the method learned (movement scores, ...)


class OBertPruningCallback(TrainerCallback):
    """Gradual pruning on ``schedule`` with ``config``'s method (its ``sparsity`` is ignored)."""

    def __init__(self, schedule: PruningSchedule, config: PruneConfig, train_dataset,
                 data_collator: Callable, *, include: list[str] | None = None,
                 exclude: list[str] | None = None, log: Callable[[str], None] = print,
                 initial_masks: dict[str, torch.Tensor] | None = None) -> None:
        """``initial_masks`` (target name -> bool, True = kept): weights pruned before this run
        (a sparse starting model), held at zero from the start and never regrown."""
        self.schedule = schedule
        self.initial_masks = initial_masks
        self.config = config
        self.train_dataset = train_dataset
        self.data_collator = data_collator
        self.include, self.exclude = include, exclude
        self._log = log
        self.masks: MaskSet | None = None
        self.method = METHODS[config.method](config)  # one instance for the run (its lifecycle)
        self.history: list[dict] = []  # one record per pruning step done
        self.plan: list[tuple[int, float]] = []
        self._resume_masks: dict[str, torch.Tensor] | None = None

    # -- data for the Fisher ---------------------------------------------------------------
    def gradient_batches(self, seed: int):
        """A shuffled pass over the training set in mini-batches of ``grad_batch_size``."""
        gen = torch.Generator().manual_seed(seed)
        return iter(DataLoader(self.train_dataset, batch_size=self.config.grad_batch_size,
                               shuffle=True, generator=gen, collate_fn=self.data_collator))

    def log(self, msg: str) -> None:
        if rank() == 0:
            self._log(msg)

    @property
    def sparsity(self) -> float:
        return self.masks.stats()["global_sparsity"] if self.masks is not None else 0.0

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        targets = find_targets(model, self.include, self.exclude)
        if self.schedule.end_epoch > float(args.num_train_epochs) + 1e-9:
            raise ObertError(f"pruning ends at epoch {self.schedule.end_epoch} but training "
                             f"has only {args.num_train_epochs} epochs")
        self.plan = self.schedule.steps(steps_per_epoch(state.max_steps, args.num_train_epochs))
        if self._resume_masks is not None:
            self.masks = MaskSet(targets, self._resume_masks)
        elif state.global_step > 0:  # resumed without our state: pruned weights are the zeros
            self.masks = MaskSet.from_zeros(targets)
        else:
            self.masks = MaskSet(targets, self.initial_masks)
        self.masks.attach()
        self.masks.apply()
        self.method.on_train_begin(model, targets, self.masks)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._prune_due(state, model, optimizer, until=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.method.on_gradients(model, self.masks.targets, self.masks)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.masks.apply()
        self.method.on_optimizer_step(model, self.masks.targets, self.masks)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # A schedule ending on the last step prunes after training (no step follows it).
        self._prune_due(state, model, optimizer, until=state.max_steps)
        self.method.on_train_end(model, self.masks.targets, self.masks)
        self.masks.detach()

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or self.masks is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.save_checkpoint(folder)

    # -- pruning ---------------------------------------------------------------------------
    def _prune_due(self, state, model, optimizer, until: int) -> None:
        done = {h["step"] for h in self.history}
        for k, (step, sparsity) in enumerate(self.plan):
            if step <= until and step not in done and step >= state.global_step:
                self.prune_step(model, optimizer, k, step, sparsity, state)

    def prune_step(self, model, optimizer, k: int, step: int, sparsity: float, state) -> None:
        """Prune to ``sparsity`` now (schedule step ``k``), with fresh gradients for the Fisher."""
        config = self.config.model_copy(update={"sparsity": sparsity,
                                                "seed": self.config.seed + 1_000_003 * (k + 1)})
        masks, report = prune_model(model, self.masks.targets, config, self.gradient_batches,
                                    masks=self.masks, log=lambda s: None, method=self.method)
        # Identical replicas, whatever the floating-point order of each rank's reductions.
        with torch.no_grad():
            for t in masks.targets:
                broadcast(masks.masks[t.name])
                broadcast(t.module.weight.data)
        if optimizer is not None:
            zero_pruned_state(optimizer, masks)
        masks.apply()
        record = {"step": step, "epoch": state.epoch or 0.0, "schedule_index": k,
                  "target_sparsity": sparsity, "sparsity": masks.stats()["global_sparsity"],
                  "timings": report.timings,
                  **{k: v for k, v in report.steps[-1].items() if k.startswith("damping")}}
        self.history.append(record)
        self.log(f"[obert] pruning step {k + 1}/{len(self.plan)} at optimizer step {step}: "
                 f"sparsity {record['sparsity']:.4f} (target {sparsity:.4f})")

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        tmp = folder / f".{MASKS_FILE}.tmp"
        save_file({n: m.to(torch.uint8).cpu().contiguous() for n, m in self.masks.masks.items()},
                  str(tmp))
        tmp.replace(folder / MASKS_FILE)
        learned = self.method.state_dict()
        if learned:
            tmp = folder / f".{METHOD_FILE}.tmp"
            save_file({k: v.cpu().contiguous() for k, v in learned.items()}, str(tmp))
            tmp.replace(folder / METHOD_FILE)
        write_json(folder / STATE_FILE, {"history": self.history})

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore masks and history saved by ``on_save`` (call before ``trainer.train``)."""
        folder = Path(folder)
        if (folder / MASKS_FILE).is_file():
            self._resume_masks = {n: m.bool() for n, m in load_file(str(folder / MASKS_FILE)).items()}
        if (folder / STATE_FILE).is_file():
            self.history = json.loads((folder / STATE_FILE).read_text())["history"]
        if (folder / METHOD_FILE).is_file():
            self.method.load_state_dict(load_file(str(folder / METHOD_FILE)))


class MaskLockCallback(TrainerCallback):
    """Training with a fixed mask (sparse transfer): the weights pruned in ``masks`` (target name
    -> bool, True = kept) have zero gradients and are set back to zero after every optimizer
    step, so a pruned model keeps exactly its zeros, and its optimizer state stays zero there."""

    def __init__(self, masks: dict[str, torch.Tensor], *, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> None:
        self.given = masks
        self.include, self.exclude = include, exclude
        self.masks: MaskSet | None = None

    @property
    def sparsity(self) -> float:
        return self.masks.stats()["global_sparsity"] if self.masks is not None else 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        targets = [t for t in find_targets(model, self.include, self.exclude) if t.name in self.given]
        self.masks = MaskSet(targets, self.given)
        self.masks.attach()
        self.masks.apply()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.masks.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.masks.detach()


def pruned_masks(model, include: list[str] | None = None, exclude: list[str] | None = None,
                 min_sparsity: float = 0.01) -> dict[str, torch.Tensor] | None:
    """The masks of an already pruned model (weight != 0 per target), or None when its targets
    are dense: fewer than ``min_sparsity`` of their weights exactly zero (trained dense weights
    have practically none)."""
    targets = find_targets(model, include, exclude)
    masks = {t.name: t.module.weight.detach() != 0 for t in targets}
    zeros = sum(int((~m).sum()) for m in masks.values())
    return masks if zeros >= min_sparsity * sum(m.numel() for m in masks.values()) and zeros else None


def lock_note(source: str, masks: dict[str, torch.Tensor]) -> str:
    """What a run with these locked masks tells the user."""
    zeros = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    return f"{source} is {zeros:.1%} sparse: its zeros stay zero through training"


@torch.no_grad()
def zero_pruned_state(optimizer, masks: MaskSet) -> None:
    """Zero optimizer state (e.g. Adam moments) of pruned weights so it cannot push them back."""
    state = getattr(optimizer, "state", {})
    for t in masks.targets:
        for v in state.get(t.module.weight, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == t.module.weight.shape:
                v.mul_(masks.masks[t.name].to(v.dtype))
