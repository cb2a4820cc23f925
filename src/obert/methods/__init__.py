"""Pruning methods: each scores groups of weights (lower = pruned first) and updates weights."""

from .base import Method, PruneConfig
from .magnitude import Magnitude
from .obert import OBert

METHODS: dict[str, type[Method]] = {"obert": OBert, "magnitude": Magnitude}

__all__ = ["METHODS", "Magnitude", "Method", "OBert", "PruneConfig"]
