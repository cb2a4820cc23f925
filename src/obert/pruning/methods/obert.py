"""oBERT: OBS saliency and weight update from the block-diagonal empirical Fisher inverse."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from obert.pruning.fisher import FisherResult, collect_fisher
from obert.core.obs import prune_update, saliency
from obert.pruning.methods.base import Method


class OBert(Method):
    needs_gradients = True

    def __init__(self, config, fisher: FisherResult | None = None) -> None:
        """``fisher``: inverse blocks already computed on the current model, used for the first
        step instead of collecting gradients (e.g. to prune one model to several sparsities)."""
        super().__init__(config)
        self._given = fisher
        self._fisher: FisherResult | None = None
        self._times = {"grad_seconds": 0.0, "fisher_seconds": 0.0, "invert_seconds": 0.0,
                       "score_seconds": 0.0, "update_seconds": 0.0}

    def _flat(self, t) -> Tensor:
        """Weight flattened row-major, zero-padded to whole Fisher blocks."""
        w = t.module.weight.detach().reshape(-1)
        b = self.config.fisher_block_size
        return F.pad(w, (0, (-w.numel()) % b))

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        c = self.config
        if step == 0 and self._given is not None:
            self._fisher = self._given
        else:
            self._fisher = collect_fisher(model, targets, masks, loader_factory,
                                          num_grads=c.num_grads, block_size=c.fisher_block_size,
                                          damp=c.damp, seed=c.seed + 7919 * step,
                                          max_memory_gb=c.max_memory_gb)
            self._times["grad_seconds"] += self._fisher.grad_seconds
            self._times["fisher_seconds"] += self._fisher.fisher_seconds
            self._times["invert_seconds"] += self._fisher.invert_seconds
        t0 = time.perf_counter()
        out = {}
        for t in targets:
            s = saliency(self._flat(t), self._fisher.get(t.name), c.group_size)
            out[t.name] = s[: t.numel // c.group_size]  # drop the zero padding's groups
        self._times["score_seconds"] += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        assert self._fisher is not None, "scores() must run before update()"
        c = self.config
        t0 = time.perf_counter()
        for t in tqdm(targets, desc="OBS update", leave=False):
            mask = F.pad(prune[t.name].reshape(-1), (0, (-t.numel) % c.fisher_block_size))
            new = prune_update(self._flat(t), self._fisher.get(t.name), mask,
                               joint=c.update == "joint", group_size=c.group_size)
            t.module.weight.copy_(new[: t.numel].reshape(t.module.weight.shape))
        if self._fisher is not self._given:
            self._fisher.close()
        self._fisher = None
        self._times["update_seconds"] += time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        return dict(self._times)
