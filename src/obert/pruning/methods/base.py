"""The interface every pruning method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from obert.model.masks import MaskSet
from obert.model.targets import Target
from obert.pruning.settings import PruneConfig


class Method(ABC):
    """A pruning method: scores weight groups and updates the weights once the pruned groups are
    chosen, with hooks for the rest of a gradual run.

    Lifecycle. One-shot pruning (``prune_model``) calls ``scores`` then ``update`` per
    recomputation step. Gradual pruning (``OBertPruningCallback``) keeps one instance for the
    whole run: ``on_train_begin`` once, ``on_optimizer_step`` after every optimizer step (for
    methods that learn their scores while training), ``scores``/``update`` at each pruning step
    (``config`` is then that step's: its sparsity and seed), and ``on_train_end``. A new method is
    one subclass and one entry in ``obert.pruning.methods.METHODS``.
    """

    needs_gradients: bool = False  # scores() reads training batches from loader_factory

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    def on_train_begin(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """Gradual pruning starts (masks attached, nothing pruned by this run yet)."""

    def on_optimizer_step(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """After every optimizer step of a gradual run (pruned weights already held at zero)."""

    def on_train_end(self, model: nn.Module, targets: list[Target], masks: MaskSet) -> None:
        """Gradual pruning is over (the last pruning step is done)."""

    @abstractmethod
    def scores(self, model: nn.Module, targets: list[Target], masks: MaskSet,
               loader_factory: Callable[[int], Iterator], step: int) -> dict[str, Tensor]:
        """Per target: one score per group of ``group_size`` consecutive weights (lower = prune)."""

    @abstractmethod
    def update(self, targets: list[Target], prune: dict[str, Tensor]) -> None:
        """Set the weights given per-weight prune masks (True = pruned); pruned become 0."""

    def timings(self) -> dict[str, float]:
        return {}
