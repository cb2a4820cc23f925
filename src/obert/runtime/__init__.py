"""Sparse CPU inference for pruned models (issue 4, in progress).

``SparseLinear.from_linear`` runs a pruned Linear from its non-zeros with native kernels;
``compile(model)`` swaps a pruned model's sparse Linear layers for them; ``save_compiled`` /
``load_compiled`` store only the non-zeros.
"""

from .compile import CompileReport, compile, load_compiled, save_compiled, sparse_modules
from .linear import SparseLinear, pack_weight, unpack_weight

__all__ = ["CompileReport", "SparseLinear", "compile", "load_compiled", "pack_weight",
           "save_compiled", "sparse_modules", "unpack_weight"]
