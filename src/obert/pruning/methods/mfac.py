"""M-FAC pruning: OBS on a block-diagonal empirical Fisher with blocks of thousands of weights,
whose inverse is never formed (``obert.core.mfac``; the estimator is ``obert.pruning.paged``)."""

from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from obert.core.obs import group_solve, pattern_saliency
from obert.pruning.methods.base import Method
from obert.pruning.methods.obert import FisherSettings
from obert.pruning.paged import PagedMFAC, collect_mfac
from obert.pruning.settings import STRUCTURES


class MFACPruneSettings(FisherSettings):
    """M-FAC's estimate: m gradients, Fisher blocks of B weights (far larger than oBERT's), the
    OBS update through inverse-Hessian-vector products."""

    default_blocks: ClassVar[dict[str, int]] = {s: 10_000 for s in STRUCTURES}
    fisher_block_size: int | None = Field(None, gt=0, validate_default=True,
                                          description="B (default 10000)")


def group_saliency(w: Tensor, curvature: Tensor, group_size: int) -> Tensor:
    """``rho_Q = 1/2 w_Q^T [(F^-1)_QQ]^-1 w_Q`` from the diagonal (``g = 1``: ``w^2 / (2 [F^-1]_qq)``)
    or the ``[d // g, g, g]`` group blocks of ``F^-1``."""
    w = w.to(curvature.dtype)
    if group_size == 1:
        return w.square() / (2 * curvature)
    wq = w.reshape(-1, group_size, 1)
    return 0.5 * (wq * torch.linalg.solve(curvature, wq)).sum(dim=(-2, -1))


class MFACPrune(Method):
    Settings = MFACPruneSettings
    needs_gradients = True

    def __init__(self, config, estimate: PagedMFAC | None = None) -> None:
        super().__init__(config, estimate)
        self._est: PagedMFAC | None = None
        self._times = {"grad_seconds": 0.0, "fisher_seconds": 0.0, "score_seconds": 0.0,
                       "update_seconds": 0.0}

    def estimate(self, model, targets, masks, loader_factory, seed, log=print) -> PagedMFAC:
        o = self.options
        return collect_mfac(model, targets, masks, loader_factory, num_grads=o.num_grads,
                            block_size=o.fisher_block_size, damp=o.damp,
                            group_size=self.config.group_size, seed=seed,
                            max_memory_gb=o.max_memory_gb, log=log)

    def estimate_key(self) -> dict:
        return self.options.model_dump(mode="json", exclude={"update"})

    def _flat(self, t) -> Tensor:
        """Weight flattened row-major, zero-padded to whole blocks of the estimate."""
        w = t.module.weight.detach().reshape(-1)
        return F.pad(w, (0, self._est.sizes[t.name] - w.numel()))

    def pattern_scores(self, model, targets, masks, loader_factory, step, patterns) -> dict[str, Tensor]:
        """The joint OBS saliency of each pattern in each group, from the groups' blocks of
        ``F^-1`` (the estimate keeps them: its group size is the structure's M)."""
        m = patterns.shape[1]
        self._est = self.step_estimate(model, targets, masks, loader_factory, step, self._times)
        t0 = time.perf_counter()
        out = {}
        for t in targets:
            curv = self._est.curvature[t.name]
            s = pattern_saliency(self._flat(t).to(curv.device).reshape(-1, m), curv,
                                 patterns.to(curv.device))
            out[t.name] = s[: t.numel // m]
        self._times["score_seconds"] += time.perf_counter() - t0
        return out

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        g = self.config.group_size
        self._est = self.step_estimate(model, targets, masks, loader_factory, step, self._times)
        t0 = time.perf_counter()
        out = {t.name: group_saliency(self._flat(t).to(self._est.device),
                                      self._est.curvature[t.name], g)[: t.numel // g]
               for t in targets}
        self._times["score_seconds"] += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        assert self._est is not None, "scores() must run before update()"
        est, g = self._est, self.config.group_size
        joint = self.options.update == "joint"
        t0 = time.perf_counter()
        for t in tqdm(targets, desc="OBS update", leave=False):
            w = self._flat(t).to(est.device, est.dtype)
            p = F.pad(prune[t.name].reshape(-1), (0, w.numel() - t.numel)).to(est.device)
            new = torch.empty_like(w)
            bsz = est.blocks[t.name]
            for cols, f in est.chunks(t.name):
                wc, pc = w[cols].reshape(-1, bsz), p[cols].reshape(-1, bsz)
                if joint:
                    new[cols] = f.prune_update(wc, pc).reshape(-1)
                    continue
                curv = est.curvature[t.name]
                if g == 1:
                    z = wc * pc / curv[cols].reshape(-1, bsz)
                else:
                    z = group_solve(curv[cols.start // g: cols.stop // g], wc.reshape(-1, g),
                                    pc.reshape(-1, g)).reshape(wc.shape)
                new[cols] = (wc - f.ihvp(z)).masked_fill(pc, 0.0).reshape(-1)
            t.module.weight.copy_(new[: t.numel].reshape(t.module.weight.shape))
        if est is not self.given_estimate:
            est.close()
        self._est = None
        self._times["update_seconds"] += time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        return dict(self._times)
