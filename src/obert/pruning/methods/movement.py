"""Movement pruning (Sanh, Wolf, Rush, NeurIPS 2020): prune the weights moving towards zero;
and soft movement pruning, its variant with learned, regularised scores.

The score of a weight is ``S = -sum_t w_t * g_t`` over the optimizer steps of the run so far
(``g_t`` the step's gradient, ``w_t`` the weight it was taken at): the first-order estimate of
how much the loss has gained from the weight moving away from zero. The paper learns ``S`` by
straight-through gradients with the score learning rate folded in; here every step counts
equally, which ranks the same way under a constant rate. Scores of pruned weights stop (their
gradients are 0). Kept weights are not updated at a pruning step, only masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pydantic import Field

from obert.errors import ObertError
from obert.pruning.methods.base import Method
from obert.pruning.settings import Settings

STEPS = "steps"  # the key of the step count in state_dict


class Movement(Method):
    gradual_only = True

    def __init__(self, config, estimate=None) -> None:
        super().__init__(config, estimate)
        self._scores: dict[str, Tensor] = {}
        self._steps = 0

    def on_train_begin(self, model, targets, masks) -> None:
        for t in targets:  # a resumed run keeps the scores restored by load_state_dict
            w = t.module.weight
            if t.name not in self._scores:
                self._scores[t.name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            else:
                self._scores[t.name] = self._scores[t.name].to(w.device)

    @torch.no_grad()
    def on_gradients(self, model, targets, masks) -> None:
        for t in targets:
            w = t.module.weight
            if w.grad is not None:
                self._scores[t.name].sub_((w.detach() * w.grad).float())
        self._steps += 1

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        if self._steps == 0:
            raise ObertError("movement scores come from training steps and none has run yet: "
                             "start pruning after some training (pruning.start_epoch > 0)")
        g = self.config.group_size
        return {t.name: self._scores[t.name].reshape(-1, g).sum(1) for t in targets}

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        for t in targets:
            t.module.weight.masked_fill_(prune[t.name], 0.0)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self._scores, STEPS: torch.tensor(self._steps)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self._steps = int(state.pop(STEPS))
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
    weights are 0, so their scores only feel the penalty: masks never grow back.
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
        for t in targets:
            w, score = t.module.weight, self._params[t.name]
            task = (w.detach() * w.grad).float() if w.grad is not None else torch.zeros_like(score)
            sig = torch.sigmoid(score)
            score.grad = task.add_(sig * (1 - sig), alpha=lam)
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
