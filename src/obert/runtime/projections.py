"""Sparse layers that read the same tensor (a block's Q, K and V) run as one kernel call.

Each call of a sparse layer pays fixed costs that do not shrink with sparsity: packing (for int8:
quantising) the input, the output pass, the threads' start. Q, K and V read the same hidden
states, so ``JoinedProjections`` runs them as one ``SparseLinear`` with their rows joined
(``SparseLinear.concat``) and ``Projection`` modules stand in for the three: the first one called
with an input runs the joined layer, every one returns its slice of that output (a view, the
layout the attention kernel reads). The output is bit-for-bit that of three separate calls: every
output row is computed alone and each token's input quantisation does not depend on the rows.

The model's own forward is unchanged (it still calls ``query(x)``, ``key(x)``, ``value(x)``), so
any attention code keeps working. A member called with a different tensor than the others simply
runs the joined layer on it: slower, never wrong.
"""

from __future__ import annotations

from torch import Tensor, nn

from .linear import ROWS, SparseLinear, same_input_scaling

# Child names of attention modules whose three projections read one input.
TRIPLES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))


class JoinedProjections(nn.Module):
    """Several sparse layers over one input as a single ``SparseLinear`` (``fused``)."""

    def __init__(self, fused: SparseLinear, sizes: list[int]) -> None:
        super().__init__()
        self.fused, self.sizes = fused, list(sizes)
        self._input: Tensor | None = None  # the input the cached outputs belong to (kept alive,
        self._version = -1                 # so no other tensor can take its id meanwhile)
        self._outputs: tuple[Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, x: Tensor, index: int) -> Tensor:
        """Member ``index``'s output for input ``x``, running the joined layer when ``x`` is new."""
        version = _version(x)
        if self._input is not x or self._version != version:
            self._outputs = self.fused(x).split(self.sizes, dim=-1)
            self._input, self._version = x, version
            self._pending = set(range(len(self.sizes)))
        out = self._outputs[index]
        self._pending.discard(index)
        if not self._pending:  # every member has its output: let the tensors go
            self._input, self._outputs = None, ()
        return out


def _version(x: Tensor) -> int:
    """``x``'s in-place version counter (inference tensors have none: -1)."""
    return -1 if x.is_inference() else x._version


class Projection(nn.Module):
    """Stands in for member ``index`` of a ``JoinedProjections``; the first member owns it (it is
    saved and moved with that member), the others refer to it."""

    def __init__(self, joined: JoinedProjections, index: int) -> None:
        super().__init__()
        if index == 0:
            self.joined = joined
        else:
            object.__setattr__(self, "_shared", joined)  # not a child: saved once, under member 0
        self.index = index
        self.in_features = joined.fused.in_features
        self.out_features = joined.sizes[index]

    @property
    def group(self) -> JoinedProjections:
        return self.joined if self.index == 0 else self._shared

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"member {self.index} of {len(self.group.sizes)}, out_features={self.out_features}"


def joinable(layers: list[nn.Module]) -> bool:
    """Sparse layers ``SparseLinear.concat`` can join (same input size, dtype, block, chunk and
    input scaling, no fused activation, row-block-aligned outputs)."""
    if not all(isinstance(m, SparseLinear) for m in layers):
        return False
    first = layers[0]
    return all((m.in_features, m.quantized, m.group, m.chunk) ==
               (first.in_features, first.quantized, first.group, first.chunk)
               and m.activation is None for m in layers) and \
        all(m.out_features % ROWS == 0 for m in layers[:-1]) and same_input_scaling(layers)


def find_triples(model: nn.Module) -> list[list[str]]:
    """Names of each attention module's Q, K, V when all three are joinable sparse layers."""
    found = []
    for name, module in model.named_modules():
        for triple in TRIPLES:
            members = [getattr(module, n, None) for n in triple]
            if all(m is not None for m in members) and joinable(members):
                found.append([f"{name}.{n}" if name else n for n in triple])
    return found


def install(model: nn.Module, names: list[str], fused: SparseLinear, sizes: list[int]) -> None:
    """Put ``Projection`` members of one ``JoinedProjections(fused, sizes)`` at ``names``."""
    joined = JoinedProjections(fused, sizes)
    for i, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Projection(joined, i))


def join(model: nn.Module, groups: list[list[str]] | None = None) -> list[list[str]]:
    """Join the layers of each group of names (default: ``find_triples``); returns the groups."""
    groups = find_triples(model) if groups is None else groups
    for names in groups:
        layers = [model.get_submodule(n) for n in names]
        install(model, names, SparseLinear.concat(layers), [m.out_features for m in layers])
    return groups
