"""Sparse CPU inference for pruned models (work in progress, issue 4): ``SparseLinear``."""

from .linear import SparseLinear, csr_from_dense

__all__ = ["SparseLinear", "csr_from_dense"]
