"""obert: second-order (Optimal BERT Surgeon) pruning of transformer language models."""

from .errors import ObertError
from .masks import MaskSet
from .methods import PruneConfig
from .obs import fisher_inverse_blocks, prune_update, saliency
from .prune import prune_model
from .targets import find_targets

__version__ = "0.1.0"
__all__ = ["MaskSet", "ObertError", "PruneConfig", "find_targets", "fisher_inverse_blocks",
           "prune_model", "prune_update", "saliency", "__version__"]
