"""obert: second-order (Optimal BERT Surgeon) pruning of transformer language models.

The names below load on first use, so ``import obert`` (and the ``obert`` command's start-up,
where a Ctrl-C must still give one line) does not pay for PyTorch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load on first use
    from obert.core.mfac import MFAC
    from obert.core.obs import fisher_inverse_blocks, prune_update, saliency
    from obert.errors import ObertError
    from obert.model.masks import MaskSet
    from obert.model.targets import find_targets
    from obert.pruning.driver import prune_model
    from obert.pruning.methods import PruneConfig
    from obert.training.optim import MFACOptimizer

__version__ = "0.1.0"
_EXPORTS = {"MFAC": "obert.core.mfac", "MFACOptimizer": "obert.training.optim",
            "MaskSet": "obert.model.masks", "ObertError": "obert.errors",
            "PruneConfig": "obert.pruning.methods", "fisher_inverse_blocks": "obert.core.obs",
            "prune_update": "obert.core.obs", "saliency": "obert.core.obs",
            "prune_model": "obert.pruning.driver", "find_targets": "obert.model.targets"}
__all__ = ["MFAC", "MFACOptimizer", "MaskSet", "ObertError", "PruneConfig", "find_targets", "fisher_inverse_blocks",
           "prune_model", "prune_update", "saliency", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'obert' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
