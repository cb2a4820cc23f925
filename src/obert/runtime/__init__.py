"""Sparse CPU inference for pruned models (work in progress, issue 4): ``SparseLinear``."""

from .linear import SparseLinear, pack_weight, unpack_weight

__all__ = ["SparseLinear", "pack_weight", "unpack_weight"]
