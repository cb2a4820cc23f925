"""The interface every pruning method implements, and the settings of a pruning run."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from obert.errors import ObertError
from obert.model.masks import MaskSet
from obert.model.targets import Target

STRUCTURES = {"unstructured": 1, "block4": 4}  # structure -> group size along the input dim
DEFAULT_BLOCK = {"unstructured": 50, "block4": 32}


def _option(field: str) -> str:
    return "--max-memory" if field == "max_memory_gb" else "--" + field.replace("_", "-")


@dataclass
class PruneConfig:
    """Settings of one-shot pruning (defaults follow the oBERT paper where it gives them)."""

    sparsity: float
    method: str = "obert"
    structure: str = "unstructured"
    scope: str = "global"  # global: one threshold over all layers; uniform: same sparsity per layer
    num_grads: int = 256
    grad_batch_size: int = 16
    fisher_block_size: int | None = None  # 50 for unstructured, 32 for block4
    damp: float = 1e-7
    num_recomputations: int = 1
    update: str = "joint"  # joint (exact per-block optimum) or independent (the paper's sum)
    max_memory_gb: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sparsity", "damp", "max_memory_gb"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ObertError(f"{_option(name)} must be a finite number, got {value}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ObertError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        from obert.pruning.methods import METHODS  # the registered methods

        for name, choices in (("method", tuple(METHODS)), ("structure", tuple(STRUCTURES)),
                              ("scope", ("global", "uniform")), ("update", ("joint", "independent"))):
            if getattr(self, name) not in choices:
                raise ObertError(f"{_option(name)} must be {' or '.join(choices)}, "
                                 f"got '{getattr(self, name)}'")
        if self.fisher_block_size is None:
            self.fisher_block_size = DEFAULT_BLOCK[self.structure]
        if self.fisher_block_size < 1 or self.fisher_block_size % self.group_size:
            raise ObertError(f"--fisher-block-size must be a positive multiple of the group size "
                             f"{self.group_size}, got {self.fisher_block_size}")
        for name in ("num_grads", "grad_batch_size", "num_recomputations"):
            if getattr(self, name) < 1:
                raise ObertError(f"{_option(name)} must be at least 1, got {getattr(self, name)}")
        if self.damp <= 0:
            raise ObertError(f"--damp must be positive, got {self.damp}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ObertError(f"--max-memory must be positive, got {self.max_memory_gb}")
        if not 0 <= self.seed < 2**32:
            raise ObertError(f"--seed must be in [0, 2^32), got {self.seed}")

    @property
    def group_size(self) -> int:
        return STRUCTURES[self.structure]

    def as_dict(self) -> dict:
        return asdict(self)


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
