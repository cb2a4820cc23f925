"""obert: second-order (Optimal BERT Surgeon) pruning of transformer language models.

The names below load on first use, so ``import obert`` (and the ``obert`` command's start-up,
where a Ctrl-C must still give one line) does not pay for PyTorch until it is needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"MaskSet": ".masks", "ObertError": ".errors", "PruneConfig": ".methods",
            "fisher_inverse_blocks": ".obs", "prune_update": ".obs", "saliency": ".obs",
            "prune_model": ".prune", "find_targets": ".targets"}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'obert' has no attribute '{name}'")
