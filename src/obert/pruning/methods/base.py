"""The interface every pruning method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from obert.model.masks import MaskSet
from obert.model.targets import Target
from obert.pruning.settings import NoSettings, PruneConfig


class Method(ABC):
    """A pruning method: its own settings, an optional curvature estimate, scores of weight
    groups and the weight update once the pruned groups are chosen, and hooks for the rest of a
    gradual run.

    Settings. ``Settings`` is the method's own typed model (pydantic, fields with defaults,
    checks and a description); ``PruneConfig``, recipes and the ``obert prune`` options take its
    fields, and ``self.options`` holds the validated values. The validation context has
    ``structure`` (a block size may depend on the group size).

    Lifecycle. One-shot pruning (``prune_model``) calls ``scores`` then ``update`` per
    recomputation step. Gradual pruning (``OBertPruningCallback``) keeps one instance for the
    whole run: ``on_train_begin`` once, ``on_gradients`` before and ``on_optimizer_step`` after
    every optimizer step (for methods that learn their scores while training),
    ``scores``/``update`` at each pruning step (``config`` is then that step's: its sparsity and
    seed), and ``on_train_end``. What such a method learns is its ``state_dict`` (tensors), saved
    in the run's checkpoints and restored by ``load_state_dict`` before ``on_train_begin``. A new
    method is one subclass and one entry in ``obert.pruning.methods.METHODS``.
    """

    Settings: ClassVar[type[BaseModel]] = NoSettings
    needs_gradients: ClassVar[bool] = False  # scores() reads training batches from loader_factory
    gradual_only: ClassVar[bool] = False  # its scores are learned while training: no one-shot

    def __init__(self, config: PruneConfig, estimate: object | None = None) -> None:
        """``estimate``: what ``estimate()`` returned on the model as it is now, for the first
        ``scores`` call instead of estimating again (to prune one model to several sparsities)."""
        self.config = config
        self.given_estimate = estimate
        self.trial = False  # trying one of damping_candidates: the estimate is used again

    @property
    def options(self) -> BaseModel:
        """This method's settings (a ``Settings`` instance) for the current config."""
        return self.config.options

    def estimate(self, model: nn.Module, targets: list[Target], masks: MaskSet,
                 loader_factory: Callable[[int], Iterator] | None, seed: int,
                 log: Callable[[str], None] = print) -> object | None:
        """The method's curvature estimate of ``model`` (None: it has none). The result has
        ``close()`` (free what it holds) and ``timings()`` (seconds per phase)."""
        return None

    def step_estimate(self, model: nn.Module, targets: list[Target], masks: MaskSet,
                      loader_factory: Callable[[int], Iterator], step: int,
                      times: dict[str, float]) -> object | None:
        """The estimate for recomputation step ``step``: the one given at construction for step
        0, else a fresh ``estimate`` with a per-step seed (its timings added to ``times``)."""
        if step == 0 and self.given_estimate is not None:
            return self.given_estimate
        est = self.estimate(model, targets, masks, loader_factory, seed=self.config.seed + 7919 * step)
        for k, v in est.timings().items():
            times[k] = times.get(k, 0.0) + v
        return est

    def estimate_key(self) -> dict:
        """The settings ``estimate()`` depends on: equal keys (with the same model, batches and
        seed) give the same estimate."""
        return self.options.model_dump(mode="json")

    def on_train_begin(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """Gradual pruning starts (masks attached, nothing pruned by this run yet)."""

    def on_gradients(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """Before every optimizer step of a gradual run: the step's gradients are in ``.grad``
        (clipped; pruned weights' gradients are 0) and the weights are those they were taken at."""

    def on_optimizer_step(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """After every optimizer step of a gradual run (pruned weights already held at zero)."""

    def state_dict(self) -> dict[str, Tensor]:
        """What the method learned during a gradual run (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore ``state_dict()`` (a resumed run; called before ``on_train_begin``)."""

    def on_train_end(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """Gradual pruning is over (the last pruning step is done)."""

    @abstractmethod
    def scores(self, model: nn.Module, targets: list[Target], masks: MaskSet,
               loader_factory: Callable[[int], Iterator], step: int) -> dict[str, Tensor]:
        """Per target: one score per group of ``group_size`` consecutive weights (lower = prune)."""

    def damping_candidates(self) -> tuple[float, ...]:
        """Dampings to choose from at each pruning step (``--damp auto``; empty: none). The
        driver tries each (``use_damping``, then ``scores`` and ``update`` with ``trial`` set,
        which must keep the step's estimate) and keeps the one with the lowest held-out loss."""
        return ()

    def damping_scale(self) -> float | None:
        """What one unit of ``damping_candidates`` is as an absolute damping on this step's
        estimate (None: the method has no such scale)."""
        return None

    def use_damping(self, damping: float) -> None:
        """Score and update with this candidate of ``damping_candidates`` from now on."""
        raise NotImplementedError

    def pattern_scores(self, model: nn.Module, targets: list[Target], masks: MaskSet,
                       loader_factory: Callable[[int], Iterator], step: int,
                       patterns: Tensor) -> dict[str, Tensor]:
        """N:M structures: per target, the score of pruning each pattern (rows of ``patterns``,
        ``[P, M]`` bool, True = pruned) in each group of ``M`` consecutive weights: ``[groups, P]``
        (lower = prune; ``update`` follows with the chosen patterns). Default: the sum over the
        pattern of the single-weight ``scores`` (for methods whose weights count independently)."""
        config = self.config
        self.config = config.model_copy(update={"structure": "unstructured"})
        try:
            single = self.scores(model, targets, masks, loader_factory, step)
        finally:
            self.config = config
        m = patterns.shape[1]
        return {name: s.reshape(-1, m).double() @ patterns.T.to(s.device, torch.float64)
                for name, s in single.items()}

    def regrowable(self, target: Target) -> Tensor | None:
        """Pruned weights of ``target`` that a pruning step may bring back (bool, shaped like the
        weight), or None: pruned weights stay pruned and masks only grow (the default)."""
        return None

    @abstractmethod
    def update(self, targets: list[Target], prune: dict[str, Tensor]) -> None:
        """Set the weights given per-weight prune masks (True = pruned); pruned become 0."""

    def timings(self) -> dict[str, float]:
        return {}
