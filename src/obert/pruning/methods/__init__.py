"""Pruning methods: each scores groups of weights (lower = pruned first) and updates weights."""

from obert.pruning.methods.base import Method, PruneConfig
from obert.pruning.methods.magnitude import Magnitude
from obert.pruning.methods.mfac import MFACPrune, MFACPruneSettings
from obert.pruning.methods.movement import Movement, MovementSettings, SoftMovement, SoftMovementSettings
from obert.pruning.methods.obert import OBert, OBertSettings, WoodFisher

METHODS: dict[str, type[Method]] = {"obert": OBert, "magnitude": Magnitude, "woodfisher": WoodFisher,
                                    "mfac": MFACPrune, "movement": Movement, "soft-movement": SoftMovement}

__all__ = ["METHODS", "MFACPrune", "MFACPruneSettings", "Magnitude", "Method", "Movement",
           "MovementSettings", "OBert", "OBertSettings", "PruneConfig", "SoftMovement",
           "SoftMovementSettings", "WoodFisher"]
