"""oBERT: OBS saliency and weight update from the block-diagonal empirical Fisher inverse."""

from __future__ import annotations

import time
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from obert.core.obs import group_diag_blocks, pattern_saliency, prune_update, saliency
from obert.pruning.fisher import FisherResult, collect_fisher
from obert.pruning.methods.base import Method
from obert.pruning.settings import STRUCTURES, Settings, either

DEFAULT_BLOCK = {"unstructured": 50, "block4": 32, "2:4": 32, "4:8": 32}
# --damp auto tries these dampings relative to each block's mean Fisher diagonal: wide enough to
# cover the paper's absolute 1e-7..1e-4 on fine-tuned BERT gradients and beyond.
AUTO_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


class FisherSettings(Settings):
    """What the methods estimating an empirical Fisher from m gradients share: m, the block size
    B (``default_blocks`` per structure; a multiple of the group size), the damping, the update
    rule and the memory budget."""

    default_blocks: ClassVar[dict[str, int]] = {}

    # 256: a quarter of the paper's 1024, four times cheaper on a CPU; recipes/ set their own.
    num_grads: int = Field(256, gt=0, description="m: mini-batch gradients for the Fisher (paper: 1024)")
    fisher_block_size: int | None = Field(None, gt=0, validate_default=True,
                                          description="B (default 50; 32 for block4 and N:M)")
    damp: float = Field(1e-7, gt=0, description="Fisher damping lambda (absolute)")
    update: str = Field("joint", description="joint (exact per-block OBS) or independent (paper)")
    max_memory_gb: float | None = Field(None, gt=0, description="GiB for Fisher blocks (default: 80% "
                                                                "of free)")

    @field_validator("update")
    @classmethod
    def _update(cls, value: str) -> str:
        if value not in ("joint", "independent"):
            raise ValueError(f"must be {either(('joint', 'independent'))}, got '{value}'")
        return value

    @field_validator("fisher_block_size")
    @classmethod
    def _whole_groups(cls, value: int | None, info: ValidationInfo) -> int:
        structure = (info.context or {}).get("structure", "unstructured")
        if value is None:
            return cls.default_blocks[structure]
        group = STRUCTURES[structure]
        if value % group:
            raise ValueError(f"must be a positive multiple of the group size {group}, got {value}")
        return value


class OBertSettings(FisherSettings):
    """oBERT's second-order estimate: m gradients into B x B blocks of the damped empirical
    Fisher, and how the surviving weights are updated."""

    default_blocks: ClassVar[dict[str, int]] = DEFAULT_BLOCK
    damp: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        1e-7, description="Fisher damping lambda (absolute), or auto: per pruning step, the "
                          "damping, in units of the mean Fisher diagonal of all blocks (from "
                          f"{', '.join(f'{r:g}' for r in AUTO_GRID)}) whose OBS update scores best on "
                          "held-out batches (auto_criterion)")
    auto_batches: int = Field(4, gt=0, description="held-out mini-batches scoring each damping of "
                                                   "--damp auto")
    auto_criterion: Literal["kl", "loss"] = Field(
        "kl", description="what --damp auto minimises on them: kl (divergence of the pruned "
                          "model's predictions from the model's before the step) or loss (task loss)")

    @field_validator("damp", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        if isinstance(value, str) and value != "auto":
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"must be a positive number or auto, got '{value}'") from None
        return value


class WoodFisherSettings(FisherSettings):
    """WoodFisher (Singh & Alistarh, NeurIPS 2020): single-weight OBS whose block inverses are
    built by the rank-one Woodbury recursion, pruned weights updated independently."""

    default_blocks: ClassVar[dict[str, int]] = DEFAULT_BLOCK
    update: str = Field("independent", description="independent (WoodFisher: the sum of "
                                                    "single-weight updates) or joint")

    @model_validator(mode="after")
    def _single_weights(self, info: ValidationInfo):
        structure = (info.context or {}).get("structure", "unstructured")
        if structure != "unstructured":
            raise ValueError(f"woodfisher prunes single weights: use structure unstructured, "
                             f"not {structure} (obert prunes groups)")
        return self


class OBert(Method):
    Settings = OBertSettings
    needs_gradients = True
    woodbury: ClassVar[bool] = False  # build the inverse by the rank-one recursion (WoodFisher)

    def __init__(self, config, estimate: FisherResult | None = None) -> None:
        super().__init__(config, estimate)
        self._fisher: FisherResult | None = None
        self._fisher_step = -1
        self._damping: float | None = None  # --damp auto: the relative damping in use
        self._times = {"grad_seconds": 0.0, "fisher_seconds": 0.0, "invert_seconds": 0.0,
                       "score_seconds": 0.0, "update_seconds": 0.0}

    def estimate(self, model, targets, masks, loader_factory, seed, log=print) -> FisherResult:
        o = self.options
        return collect_fisher(model, targets, masks, loader_factory, num_grads=o.num_grads,
                              block_size=o.fisher_block_size,
                              damp=None if o.damp == "auto" else o.damp, seed=seed,
                              max_memory_gb=o.max_memory_gb, woodbury=self.woodbury, log=log)

    def estimate_key(self) -> dict:
        # the update and how --damp auto scores its candidates do not change the Fisher
        return self.options.model_dump(mode="json", exclude={"update", "auto_batches", "auto_criterion"})

    def _flat(self, t) -> Tensor:
        """Weight flattened row-major, zero-padded to whole Fisher blocks."""
        w = t.module.weight.detach().reshape(-1)
        b = self.options.fisher_block_size
        return F.pad(w, (0, (-w.numel()) % b))

    def damping_candidates(self) -> tuple[float, ...]:
        """``--damp auto``: the relative dampings to try at each pruning step (else none)."""
        return AUTO_GRID if getattr(self.options, "damp", None) == "auto" else ()

    def use_damping(self, relative: float) -> None:
        """Score and update with the Gram blocks inverted at this relative damping."""
        self._damping = relative

    def damping_scale(self) -> float | None:
        return self._fisher.fisher_scale() if self._fisher is not None and self._fisher.grams else None

    def _estimate_step(self, model, targets, masks, loader_factory, step) -> None:
        if self._fisher is None or self._fisher_step != step:
            # (trials of --damp auto score one estimate with several dampings)
            self._fisher_step = step
            self._fisher = self.step_estimate(model, targets, masks, loader_factory, step, self._times)
        if self._fisher.grams and self._fisher.damping != self._damping:
            before = self._fisher.invert_seconds
            self._fisher.use_damping(self._damping)
            self._times["invert_seconds"] += self._fisher.invert_seconds - before
            self._times["fisher_seconds"] += self._fisher.invert_seconds - before

    def scores(self, model, targets, masks, loader_factory, step) -> dict[str, Tensor]:
        g = self.config.group_size
        self._estimate_step(model, targets, masks, loader_factory, step)
        t0 = time.perf_counter()
        out = {}
        for t in targets:
            s = saliency(self._flat(t), self._fisher.get(t.name), g)
            out[t.name] = s[: t.numel // g]  # drop the zero padding's groups
        self._times["score_seconds"] += time.perf_counter() - t0
        return out

    def pattern_scores(self, model, targets, masks, loader_factory, step, patterns) -> dict[str, Tensor]:
        """The joint OBS saliency of each pattern in each group (``pattern_saliency``)."""
        m = patterns.shape[1]
        self._estimate_step(model, targets, masks, loader_factory, step)
        t0 = time.perf_counter()
        out = {}
        for t in targets:
            blocks = group_diag_blocks(self._fisher.get(t.name), m).reshape(-1, m, m)
            s = pattern_saliency(self._flat(t).reshape(-1, m), blocks, patterns.to(blocks.device))
            out[t.name] = s[: t.numel // m]
        self._times["score_seconds"] += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def update(self, targets, prune) -> None:
        assert self._fisher is not None, "scores() must run before update()"
        o, g = self.options, self.config.group_size
        t0 = time.perf_counter()
        for t in tqdm(targets, desc="OBS update", leave=False):
            mask = F.pad(prune[t.name].reshape(-1), (0, (-t.numel) % o.fisher_block_size))
            new = prune_update(self._flat(t), self._fisher.get(t.name), mask,
                               joint=o.update == "joint", group_size=g)
            t.module.weight.copy_(new[: t.numel].reshape(t.module.weight.shape))
        self._times["update_seconds"] += time.perf_counter() - t0
        if self.trial:
            return
        if self._fisher is not self.given_estimate:
            self._fisher.close()
        self._fisher = None
        self._fisher_step = -1

    def timings(self) -> dict[str, float]:
        return dict(self._times)


class WoodFisher(OBert):
    """OBS of single weights on the Woodbury-built block Fisher inverse (the oBERT paper's
    WoodFisher baseline): oBERT's scores and updates, WoodFisher's estimator and defaults."""

    Settings = WoodFisherSettings
    woodbury = True
