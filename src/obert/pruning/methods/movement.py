"""Movement pruning (Sanh, Wolf, Rush, NeurIPS 2020): prune the weights moving towards zero;
and soft movement pruning, its variant with learned, regularised scores.

The score of a weight is ``S = -sum_t w_t * g_t`` over the optimizer steps of the run so far
(``g_t`` the gradient at the weight's position, ``w_t`` the weight it was taken at): the
first-order estimate of how much the loss has gained from the weight moving away from zero. The
paper learns ``S`` by straight-through gradients with the score learning rate folded in; here
every step counts equally, which ranks the same way under a constant rate. As in the paper, a
pruned weight keeps its value aside (it is 0 in the model) and its score keeps moving with the
gradient at its position (straight-through: ``-w * g`` with the value kept aside), so a later
pruning step may bring it back with that value when its score has risen above kept ones'. Kept
weights are not updated at a pruning step, only masked. Weights that were pruned before the run
started stay pruned.
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
ASIDE, PRUNED = ".aside", ".pruned"  # state_dict suffixes: pruned weights' values, which they are


class Movement(Method):
    gradual_only = True

    def __init__(self, config, estimate=None) -> None:
        super().__init__(config, estimate)
        self._scores: dict[str, Tensor] = {}
        self._aside: dict[str, Tensor] = {}  # values of the weights this run pruned (0 elsewhere)
        self._pruned: dict[str, Tensor] = {}  # the weights this run pruned
        self._grads: dict[str, Tensor] = {}  # the step's gradients before masking
        self._steps = 0

    def on_train_begin(self, model, targets, masks) -> None:
        for t in targets:  # a resumed run keeps the state restored by load_state_dict
            w = t.module.weight
            for store, dtype in ((self._scores, torch.float32), (self._aside, torch.float32),
                                 (self._pruned, torch.bool)):
                store[t.name] = store[t.name].to(w.device, dtype) if t.name in store else \
                    torch.zeros(w.shape, dtype=dtype, device=w.device)
            self._grads[t.name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        masks.grad_observers.append(self._observe)

    @torch.no_grad()
    def _observe(self, name: str, grad: Tensor) -> None:
        if name in self._grads:  # summed over the micro-batches of a step, like .grad
            self._grads[name].add_(grad.detach().float())

    @torch.no_grad()
    def step_gradients(self, targets) -> dict[str, Tensor]:
        """The step's unmasked gradients, averaged over processes as the optimizer's are (the
        buffers are reset for the next step)."""
        world = world_size()
        out = {}
        for t in targets:
            g = all_reduce_sum(self._grads[t.name].clone())
            out[t.name] = g.div_(world) if world > 1 else g
            self._grads[t.name].zero_()
        return out

    def values(self, t) -> Tensor:
        """The weights as movement sees them: the model's, and the pruned ones' values aside."""
        return t.module.weight.detach().float() + self._aside[t.name]

    @torch.no_grad()
    def on_gradients(self, model, targets, masks) -> None:
        for t, g in zip(targets, self.step_gradients(targets).values()):
            self._scores[t.name].sub_(self.values(t) * g)
        self._steps += 1

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        if self._steps == 0:
            raise ObertError("movement scores come from training steps and none has run yet: "
                             "start pruning after some training (pruning.start_epoch > 0)")
        g = self.config.group_size
        return {t.name: self._scores[t.name].reshape(-1, g).sum(1) for t in targets}

    def regrowable(self, target) -> Tensor | None:
        return self._pruned.get(target.name)

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        for t in targets:
            w, aside, mine = t.module.weight, self._aside[t.name], self._pruned[t.name]
            now = prune[t.name].to(w.device)
            back, newly = mine & ~now, now & ~mine & (w != 0)
            w[back] = aside[back].to(w.dtype)
            aside[back] = 0.0
            aside[newly] = w[newly].float()
            w.masked_fill_(now, 0.0)
            self._pruned[t.name] = mine & now | newly

    def state_dict(self) -> dict[str, Tensor]:
        return {**self._scores, **{f"{k}{ASIDE}": v for k, v in self._aside.items()},
                **{f"{k}{PRUNED}": v for k, v in self._pruned.items()}, STEPS: torch.tensor(self._steps)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self._steps = int(state.pop(STEPS))
        for suffix, store, dtype in ((ASIDE, self._aside, torch.float32), (PRUNED, self._pruned, torch.bool)):
            for k in [k for k in state if k.endswith(suffix)]:
                store[k[:-len(suffix)]] = state.pop(k).to(dtype)
        self._scores = {k: v.float() for k, v in state.items()}


class SoftMovementSettings(Settings):
    """The scores' own optimizer and the penalty that drives them down."""

    score_lr: float = Field(1e-2, gt=0, description="learning rate of the scores (Adam; the paper's 1e-2)")
    regularization: float = Field(
        100.0, ge=0, description="lambda of the penalty lambda * mean(sigmoid(S)) over all target "
        "weights (0: learned scores without the penalty)")


class SoftMovement(Movement):
    """Soft movement pruning: every weight has a score ``S``, a parameter learned with the model
    by the straight-through gradient of the masked weight (``dL/dS = w * dL/dw``, so descent
    moves ``S`` by ``-w * g`` as movement's sum does) plus the penalty
    ``lambda * mean(sigmoid(S))``, whose gradient ``lambda sigmoid'(S) / N`` pulls down the
    scores that the task does not hold up; Adam with ``score_lr`` (its own moments, saved with the
    scores). The weights with the lowest scores are pruned, to the schedule's sparsity: with the
    global scope one threshold over all layers, so each layer's sparsity is learned. Pruned
    weights keep their values aside and their scores keep learning, as movement's.
    """

    Settings = SoftMovementSettings

    def on_train_begin(self, model, targets, masks) -> None:
        super().on_train_begin(model, targets, masks)
        self._params = {t.name: self._scores[t.name] for t in targets}
        self._opt = torch.optim.Adam(list(self._params.values()), lr=self.options.score_lr)
        restored = getattr(self, "_restored_moments", None) or {}
        for name, score in self._params.items():
            if f"{name}.exp_avg" in restored:
                self._opt.state[score] = {
                    "step": restored[f"{name}.step"].float(),
                    "exp_avg": restored[f"{name}.exp_avg"].to(score.device),
                    "exp_avg_sq": restored[f"{name}.exp_avg_sq"].to(score.device)}
        self._numel = sum(s.numel() for s in self._params.values())

    @torch.no_grad()
    def on_gradients(self, model, targets, masks) -> None:
        lam = self.options.regularization / self._numel
        for t, g in zip(targets, self.step_gradients(targets).values()):
            score = self._params[t.name]
            sig = torch.sigmoid(score)
            score.grad = (self.values(t) * g).add_(sig * (1 - sig), alpha=lam)
        self._opt.step()
        self._steps += 1

    def state_dict(self) -> dict[str, Tensor]:
        out = super().state_dict()
        if not hasattr(self, "_opt"):  # restored, not started: what was loaded
            return {**out, **getattr(self, "_restored_moments", {})}
        for name, score in self._params.items():
            state = self._opt.state.get(score)
            if state:
                out[f"{name}.exp_avg"] = state["exp_avg"]
                out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"]
                out[f"{name}.step"] = torch.as_tensor(state["step"]).reshape(())
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        moments = ("exp_avg", "exp_avg_sq", "step")
        self._restored_moments = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in moments}
        super().load_state_dict({k: v for k, v in state.items() if k not in self._restored_moments})
