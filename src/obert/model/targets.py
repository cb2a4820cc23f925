"""Which weights obert prunes: Linear layers inside the encoder's stack of transformer blocks.

Found by module type, not per-architecture name tables: the transformer blocks are the largest
``nn.ModuleList`` whose entries hold Linear layers (BERT's ``encoder.layer``, DistilBERT's
``transformer.layer``, RoBERTa's ``encoder.layer``, ...). Embeddings, pooler and task head lie
outside it and stay dense. Users narrow or widen the set with regular expressions on names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from obert.errors import ObertError


@dataclass(frozen=True)
class Target:
    """One prunable weight: the module's dotted name and the module itself."""

    name: str
    module: nn.Linear

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``(name, ModuleList)`` of transformer blocks: the list with the most Linear layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        n_linear = sum(_is_linear(m) for m in module.modules())
        if n_linear and all(any(_is_linear(m) for m in blk.modules()) for blk in module):
            if best is None or n_linear > best[0]:
                best = (n_linear, name, module)
    return None if best is None else (best[1], best[2])


def compile_patterns(patterns: list[str] | None, option: str) -> list[re.Pattern]:
    """Compiled regular expressions, or a one-line error naming the option and the pattern."""
    compiled = []
    for p in patterns or []:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ObertError(f"{option} '{p}' is not a valid regular expression: {exc}") from None
    return compiled


def find_targets(model: nn.Module, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> list[Target]:
    """Prunable Linear layers, in model order.

    Default: every ``nn.Linear`` inside the transformer blocks. ``include`` patterns (regular
    expressions searched in the module name) replace that default with every Linear whose name
    matches; ``exclude`` patterns then remove matches.
    """
    if include:
        pats = compile_patterns(include, "include")
        found = [Target(n, m) for n, m in model.named_modules()
                 if _is_linear(m) and any(p.search(n) for p in pats)]
    else:
        blocks = transformer_blocks(model)
        if blocks is None:
            found = []
        else:
            prefix, stack = blocks
            found = [Target(f"{prefix}.{n}", m) for n, m in stack.named_modules() if _is_linear(m)]
    for pat in compile_patterns(exclude, "exclude"):
        found = [t for t in found if not pat.search(t.name)]
    if not found:
        raise ObertError("the model has no prunable layers (no Linear layers in transformer blocks "
                         "match the include/exclude patterns)")
    return found
