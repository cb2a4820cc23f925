"""Magnitude pruning: the score of a group is its squared L2 norm."""

from __future__ import annotations

import torch
from torch import Tensor

from obert.pruning.methods.base import Method


class Magnitude(Method):
    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        g = self.config.group_size
        return {t.name: t.module.weight.detach().float().square().reshape(-1, g).sum(1)
                for t in targets}

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        for t in targets:
            t.module.weight.masked_fill_(prune[t.name], 0.0)
