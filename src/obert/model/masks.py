"""Keeping pruned weights at exactly zero through further training.

A mask is a bool tensor shaped like the weight (True = kept). ``MaskSet.attach`` masks
gradients (a tensor hook) and, when given an optimizer, re-applies the masks right after each
of its steps (Adam's momentum would otherwise move pruned weights off zero). Training loops
without a hooked optimizer call ``apply()`` after each step. Saved models carry zeros; ``MaskSet.from_zeros`` rebuilds the
masks from them on reload.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from obert.model.targets import Target


class MaskSet:
    """Masks for a list of targets (module name -> bool mask)."""

    def __init__(self, targets: Iterable[Target], masks: dict[str, Tensor] | None = None) -> None:
        self.targets = list(targets)
        self.masks: dict[str, Tensor] = {}
        for t in self.targets:
            w = t.module.weight
            m = masks.get(t.name) if masks else None
            self.masks[t.name] = (torch.ones_like(w, dtype=torch.bool) if m is None
                                  else m.to(device=w.device, dtype=torch.bool))
        self._handles: list = []
        # Called as fn(name, grad) with each target's gradient before it is masked (a method
        # that lets pruned weights come back scores them by the gradient at their position).
        self.grad_observers: list = []

    @classmethod
    def from_zeros(cls, targets: Iterable[Target]) -> "MaskSet":
        """Masks that keep exactly the non-zero weights (how a saved pruned model is reloaded)."""
        targets = list(targets)
        return cls(targets, {t.name: t.module.weight.detach() != 0 for t in targets})

    def set(self, name: str, mask: Tensor) -> None:
        self.masks[name] = mask.to(dtype=torch.bool, device=self.masks[name].device)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight in place."""
        for t in self.targets:
            t.module.weight.mul_(self.masks[t.name])

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> "MaskSet":
        """Mask gradients and keep weights masked through training (idempotent)."""
        self.detach()
        for t in self.targets:
            name = t.name
            self._handles.append(t.module.weight.register_hook(
                lambda g, name=name: self._masked_gradient(name, g)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *a, **k: self.apply()))
        return self

    def _masked_gradient(self, name: str, grad: Tensor) -> Tensor:
        for observe in self.grad_observers:
            observe(name, grad)
        return grad * self.masks[name]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> dict:
        """Per-layer and global sparsity (fraction of zeros in the masks)."""
        layers = {}
        total = pruned = 0
        for t in self.targets:
            m = self.masks[t.name]
            n, z = m.numel(), int((~m).sum())
            layers[t.name] = {"numel": n, "sparsity": z / n}
            total, pruned = total + n, pruned + z
        return {"global_sparsity": pruned / max(total, 1), "num_params": total,
                "num_pruned": pruned, "layers": layers}


def sparsity_record(masks: MaskSet, *, method: str, structure: str | None, scope: str | None,
                    source: str, settings: dict | None, steps: list, **extra) -> dict:
    """What ``sparsity.json`` holds, for every command that writes one: per-layer and global
    sparsity (``masks.stats()``), how the masks were made (method, structure, scope, settings,
    the pruning steps), the model they were made from, and command-specific ``extra`` fields."""
    return {**masks.stats(), "method": method, "structure": structure, "scope": scope,
            "source_model": source, "settings": settings, "steps": steps, **extra}


def read_sparsity_record(model_dir) -> dict:
    """The ``sparsity.json`` beside a saved model, or ``{}`` when there is none or it is not a
    JSON object (it only describes; the zeros in the weights are the masks)."""
    import json
    from pathlib import Path

    try:
        record = json.loads((Path(model_dir) / "sparsity.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def inherited_record(masks: MaskSet, source: str, **extra) -> dict:
    """``sparsity.json`` of a model whose zeros came from the pruned model ``source`` (layers
    dropped, or trained with the mask locked): ``masks``' sparsity, and how the source's masks
    were made (from its record, where it has one)."""
    before = read_sparsity_record(source)
    return sparsity_record(masks, method=str(before.get("method", "unknown")),
                           structure=before.get("structure"), scope=before.get("scope"),
                           source=source, settings=before.get("settings"), steps=[], **extra)


def locked_record(masks: MaskSet, source: str) -> dict:
    """``sparsity.json`` of a model trained with the mask of the pruned model ``source`` locked."""
    return inherited_record(masks, source, mask_locked_from=source)
