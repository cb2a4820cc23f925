"""Pruning methods: each scores groups of weights (lower = pruned first) and updates weights."""

from obert.pruning.methods.base import Method, PruneConfig
from obert.pruning.methods.magnitude import Magnitude
from obert.pruning.methods.obert import OBert, OBertSettings

METHODS: dict[str, type[Method]] = {"obert": OBert, "magnitude": Magnitude}

__all__ = ["METHODS", "Magnitude", "Method", "OBert", "OBertSettings", "PruneConfig"]
