"""Sparse CPU inference for pruned models.

``SparseLinear.from_linear`` runs a pruned Linear from its non-zeros with native kernels;
``compile(model)`` swaps a pruned model's sparse Linear layers for them and fuses the rest of a
BERT-style encoder (``SparseFFN``: both feed-forward layers per token tile; ``norm.AddNorm``:
residual add + LayerNorm; ``attention``: the attention kernel); ``save_compiled`` /
``load_compiled`` store only the non-zeros.
"""

from obert.runtime.compile import CompileReport, compile, load_compiled, save_compiled, sparse_modules
from obert.runtime.linear import SparseFFN, SparseLinear, pack_weight, unpack_weight

__all__ = ["CompileReport", "SparseFFN", "SparseLinear", "compile", "load_compiled", "pack_weight",
           "save_compiled", "sparse_modules", "unpack_weight"]
