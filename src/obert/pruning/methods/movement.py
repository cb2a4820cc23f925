"""Movement pruning (Sanh, Wolf, Rush, NeurIPS 2020): prune the weights moving towards zero.

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

from obert.errors import ObertError
from obert.pruning.methods.base import Method

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
