"""When to prune and how much: the cubic sparsity schedule and learning-rate rewinding.

Times are in epochs (floats) and become optimizer steps through ``steps_per_epoch``.

* Cubic schedule (Zhu & Gupta), pruning steps at ``t_k = t0 + k * dt`` for ``k = 0..n``,
  ``n = (t_end - t0) / dt``:  ``s_k = s_f + (s_i - s_f) * (1 - k / n)^3``. The first step jumps
  one-shot to ``s_i``; the last reaches ``s_f``; after it the mask is fixed.
* Learning rate: ``rewind`` restarts a linear decay from ``lr`` to ``final_lr_ratio * lr`` at
  every pruning step (the oBERT recipes' ``cyclic_linear``); the dense phase before the first
  step and the fine-tuning phase after the last are decays of their own. ``linear`` decays once
  over the whole run, ``constant`` keeps ``lr``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from obert.errors import ObertError


def steps_per_epoch(max_steps: int, num_train_epochs: float) -> float:
    """Optimizer steps per epoch of one process, as the Trainer counts them (``max_steps / epochs``).

    The pruning callback and the LR schedule both place pruning steps with it, so they agree.
    """
    return max_steps / max(float(num_train_epochs), 1e-12)


def cubic_sparsity(k: int, n: int, init_sparsity: float, final_sparsity: float) -> float:
    """Sparsity of pruning step ``k`` of ``0..n``: ``s_f + (s_i - s_f) * (1 - k/n)^3``."""
    if n == 0:
        return final_sparsity
    return final_sparsity + (init_sparsity - final_sparsity) * (1.0 - k / n) ** 3


@dataclass(frozen=True)
class PruningSchedule:
    """Pruning steps from ``start_epoch`` to ``end_epoch`` every ``frequency`` epochs."""

    init_sparsity: float
    final_sparsity: float
    start_epoch: float
    end_epoch: float
    frequency: float

    def __post_init__(self) -> None:
        for name in ("init_sparsity", "final_sparsity"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ObertError(f"pruning.{name} must be in [0, 1), got {v}")
        if self.init_sparsity > self.final_sparsity:
            raise ObertError("pruning.init_sparsity must not exceed pruning.final_sparsity")
        if self.start_epoch < 0 or self.end_epoch < self.start_epoch:
            raise ObertError("pruning needs 0 <= start_epoch <= end_epoch")
        if self.end_epoch > self.start_epoch:
            if self.frequency <= 0:
                raise ObertError("pruning.frequency must be positive")
            n = (self.end_epoch - self.start_epoch) / self.frequency
            if abs(n - round(n)) > 1e-6:
                raise ObertError(f"pruning.frequency {self.frequency} must divide end_epoch - "
                                 f"start_epoch = {self.end_epoch - self.start_epoch}")

    @property
    def num_intervals(self) -> int:
        if self.end_epoch == self.start_epoch:
            return 0
        return round((self.end_epoch - self.start_epoch) / self.frequency)

    def epochs(self) -> list[tuple[float, float]]:
        """``(epoch, sparsity)`` of every pruning step."""
        n = self.num_intervals
        return [(self.start_epoch + k * self.frequency,
                 cubic_sparsity(k, n, self.init_sparsity, self.final_sparsity)) for k in range(n + 1)]

    def steps(self, steps_per_epoch: float) -> list[tuple[int, float]]:
        """``(optimizer step, sparsity)`` of every pruning step: pruning happens before that step."""
        out: list[tuple[int, float]] = []
        for epoch, s in self.epochs():
            step = round(epoch * steps_per_epoch)
            if out and out[-1][0] == step:  # too few steps per epoch to tell them apart
                out[-1] = (step, s)
            else:
                out.append((step, s))
        return out


def lr_factor(step: int, total_steps: int, restarts: list[int], mode: str,
              final_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer ``step``.

    ``rewind``: linear decay from 1 to ``final_ratio`` inside each cycle, cycles bounded by
    ``restarts`` (the pruning steps) and ``0``/``total_steps``. ``linear``: one decay from 1 to
    ``final_ratio`` over the run. ``constant``: 1.
    """
    if mode == "constant":
        return 1.0
    if mode == "linear":
        start, end = 0, total_steps
    elif mode == "rewind":
        bounds = sorted({0, total_steps, *(r for r in restarts if 0 < r < total_steps)})
        i = bisect.bisect_right(bounds, step) - 1
        i = min(max(i, 0), len(bounds) - 2)
        start, end = bounds[i], bounds[i + 1]
    else:
        raise ObertError(f"unknown lr schedule '{mode}' (choose rewind, linear or constant)")
    frac = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    return 1.0 - (1.0 - final_ratio) * frac


class LRFactor:
    """Picklable ``step -> factor`` for ``torch.optim.lr_scheduler.LambdaLR`` (saved in checkpoints)."""

    def __init__(self, total_steps: int, restarts: list[int], mode: str, final_ratio: float) -> None:
        self.total_steps, self.restarts, self.mode, self.final_ratio = total_steps, list(restarts), mode, final_ratio
        lr_factor(0, total_steps, self.restarts, mode, final_ratio)  # validates mode

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.restarts, self.mode, self.final_ratio)
