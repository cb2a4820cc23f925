"""Movement pruning (Sanh, Wolf, Rush, NeurIPS 2020): prune the weights moving towards zero;
and soft movement pruning, its variant with regularised scores.

Every weight has a score ``S`` learned with the model, as in the paper's code: Adam (its own
moments, learning rate ``score_lr``) on the straight-through gradient of the masked weight,
``dL/dS = w * dL/dw``, so each step moves ``S`` towards ``-w * g`` (``g`` the gradient at the
weight's position, ``w`` the weight it was taken at): up for weights moving away from zero, down
for weights moving towards it. The paper writes the score as the plain sum ``-sum_t w_t g_t``
(its SGD view); that sum grows with ``|w| |g|``, so the largest weights get the most extreme
scores either way and are pruned about as often as at random while the scores are still
dominated by noise, which wrecks a model pruned early in a short run (docs/benchmarks.md); Adam
scales every score's steps alike. As the paper's masks, a pruned weight keeps its value aside
(it is 0 in the model) and its score keeps learning from the gradient at its position, so a
later pruning step may bring it back with that value. Kept weights are not updated at a pruning
step, only masked. Weights pruned before the run started stay pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pydantic import Field

from obert.distributed import all_reduce_sum, world_size
from obert.errors import ObertError
from obert.pruning.methods.base import Method
from obert.pruning.settings import Settings

STEPS = "steps"  # the key of the step count in state_dict
ASIDE = ".aside"  # state_dict suffix: the values of the weights this run pruned
MOMENTS = ("exp_avg", "exp_avg_sq", "step")  # Adam's state of a score tensor


class MovementSettings(Settings):
    """The scores' own optimizer."""

    score_lr: float = Field(1e-2, gt=0, description="learning rate of the scores (Adam; the paper's 1e-2)")


class Movement(Method):
    """Movement pruning: the weights with the lowest learned scores are pruned to the schedule's
    sparsity (the paper's top-k; ``scope: uniform`` is its per-matrix form)."""

    Settings = MovementSettings
    gradual_only = True

    def __init__(self, config, estimate=None) -> None:
        super().__init__(config, estimate)
        self._scores: dict[str, Tensor] = {}
        # The values of the weights this run pruned, 0 elsewhere (only non-zero weights are set
        # aside, so the non-zeros are exactly the weights this run pruned).
        self._aside: dict[str, Tensor] = {}
        self._grads: dict[str, Tensor] = {}  # the step's gradients before masking
        self._moments: dict[str, Tensor] = {}  # Adam's, restored from a checkpoint
        self._steps = 0

    def on_train_begin(self, model, targets, masks) -> None:
        for t in targets:  # a resumed run keeps the state restored by load_state_dict
            w = t.module.weight
            for store in (self._scores, self._aside):
                store[t.name] = store[t.name].to(w.device, torch.float32) if t.name in store else \
                    torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            self._grads[t.name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        self._opt = torch.optim.Adam([self._scores[t.name] for t in targets], lr=self.options.score_lr)
        for t in targets:
            score = self._scores[t.name]
            if f"{t.name}.exp_avg" in self._moments:  # (Adam keeps its step count on the CPU)
                self._opt.state[score] = {
                    key: self._moments[f"{t.name}.{key}"].float().to("cpu" if key == "step" else score.device)
                    for key in MOMENTS}
        self._numel = sum(s.numel() for s in self._scores.values())
        masks.grad_observers.append(self._observe)

    @torch.no_grad()
    def _observe(self, name: str, grad: Tensor) -> None:
        if name in self._grads:  # summed over the micro-batches of a step, like .grad
            self._grads[name].add_(grad.detach().float())

    def values(self, t) -> Tensor:
        """The weights as movement sees them: the model's, and the pruned ones' values aside."""
        return t.module.weight.detach().float() + self._aside[t.name]

    def penalty_gradient(self, score: Tensor) -> Tensor | None:
        """The gradient of a regulariser of the scores (None: none)."""
        return None

    @torch.no_grad()
    def on_gradients(self, model, targets, masks) -> None:
        world = world_size()
        for t in targets:
            # The step's unmasked gradient, averaged over processes as the optimizer's is.
            g, score = all_reduce_sum(self._grads[t.name]), self._scores[t.name]
            score.grad = self.values(t) * (g / world if world > 1 else g)
            g.zero_()  # ready for the next step
            penalty = self.penalty_gradient(score)
            if penalty is not None:
                score.grad.add_(penalty)
        self._opt.step()
        self._steps += 1

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        if self._steps == 0:
            raise ObertError("movement scores come from training steps and none has run yet: "
                             "start pruning after some training (pruning.start_epoch > 0)")
        g = self.config.group_size
        return {t.name: self._scores[t.name].reshape(-1, g).sum(1) for t in targets}

    def regrowable(self, target) -> Tensor | None:
        aside = self._aside.get(target.name)
        return None if aside is None else aside != 0

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        for t in targets:
            w, aside = t.module.weight, self._aside[t.name]
            now, mine = prune[t.name].to(w.device), aside != 0
            back, newly = mine & ~now, now & ~mine & (w != 0)
            w[back] = aside[back].to(w.dtype)
            aside[back] = 0.0
            aside[newly] = w[newly].float()
            w.masked_fill_(now, 0.0)

    def state_dict(self) -> dict[str, Tensor]:
        out = {**self._scores, **{f"{k}{ASIDE}": v for k, v in self._aside.items()},
               STEPS: torch.tensor(self._steps)}
        if not hasattr(self, "_opt"):  # restored, not started: what was loaded
            return {**out, **self._moments}
        for name, score in self._scores.items():
            state = self._opt.state.get(score)
            if state:
                out.update({f"{name}.{key}": torch.as_tensor(state[key]) for key in MOMENTS})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self._steps = int(state.pop(STEPS))
        self._moments = {k: state.pop(k) for k in list(state) if k.rsplit(".", 1)[-1] in MOMENTS}
        self._aside = {k[:-len(ASIDE)]: state.pop(k).float() for k in list(state) if k.endswith(ASIDE)}
        self._scores = {k: v.float() for k, v in state.items()}


class SoftMovementSettings(MovementSettings):
    """The scores' own optimizer and the penalty that drives them down."""

    regularization: float = Field(
        100.0, ge=0, description="lambda of the penalty lambda * mean(sigmoid(S)) over all target "
        "weights (0: movement's learned scores)")


class SoftMovement(Movement):
    """Soft movement pruning: movement's learned scores plus the penalty
    ``lambda * mean(sigmoid(S))``, whose gradient ``lambda sigmoid'(S) / N`` pulls down the
    scores that the task does not hold up. The weights with the lowest scores are pruned, to the
    schedule's sparsity: with the global scope one threshold over all layers, so each layer's
    sparsity is learned.
    """

    Settings = SoftMovementSettings

    def penalty_gradient(self, score: Tensor) -> Tensor | None:
        sig = torch.sigmoid(score)
        return sig * (1 - sig) * (self.options.regularization / self._numel)
