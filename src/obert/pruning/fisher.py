"""Collecting m mini-batch gradients of the prunable weights into block-diagonal Fisher inverses.

Memory is planned before anything big is allocated: the Gram accumulators need ``4 * d * B``
bytes (float32) for ``d`` prunable weights, plus a buffer of ``chunk`` gradients (``4 * d * chunk``)
and inversion scratch for the largest module. When that exceeds the budget the modules are split
into groups, one gradient pass per group (the same mini-batches each pass, so the result is the
same as one pass), and the inverses of finished groups wait on disk.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obert.device import GiB, available_memory
from obert.distributed import all_reduce_sum, process_group
from obert.errors import ObertError
from obert.io import scratch_dir
from obert.model.heads import labelled_positions_only
from obert.model.masks import MaskSet
from obert.core.obs import StreamingFisher, StreamingWoodbury, invert_fisher
from obert.model.targets import Target

def padded_size(numel: int, block_size: int) -> int:
    """Weights are flattened and zero-padded to whole Fisher blocks."""
    return math.ceil(numel / block_size) * block_size


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (B to GiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class MemoryPlan:
    """How the Fisher accumulators are split into gradient passes, and what they cost."""

    groups: list[list[int]]  # target indices per pass
    fisher_bytes: int  # all Gram/inverse blocks
    buffer_bytes: int  # the chunk of gradients held before each Gram update
    scratch_bytes: int  # inversion/update temporaries of the largest module
    chunk: int
    budget_bytes: int

    def describe(self) -> str:
        return (f"Fisher blocks {self.fisher_bytes / GiB:.2f} GiB + gradient buffer "
                f"{self.buffer_bytes / GiB:.2f} GiB ({self.chunk} grads) + scratch "
                f"{self.scratch_bytes / GiB:.2f} GiB; budget {self.budget_bytes / GiB:.2f} GiB; "
                f"{len(self.groups)} gradient pass(es)")


def plan_memory(sizes: list[int], block_size: int, num_grads: int, budget_bytes: int,
                *, elem_bytes: int = 4, max_chunk: int = 64) -> MemoryPlan:
    """Group modules (padded sizes ``sizes``) into passes that fit ``budget_bytes``.

    Per pass: Gram blocks ``elem * d_g * B`` + chunk buffer ``elem * d_g * chunk`` + scratch of
    two copies of the largest module's blocks (Cholesky factor and inverse). Raises
    ``ObertError`` before anything is allocated when even one module cannot fit.
    """
    total = sum(sizes)
    biggest = max(sizes)
    scratch = 2 * elem_bytes * biggest * block_size
    best: tuple[int, int, list[list[int]]] | None = None
    # Larger gradient chunks make fewer, bigger Gram updates; take the largest chunk that
    # still needs the fewest passes over the data (each pass is m backward passes).
    chunk = max(1, min(max_chunk, num_grads))
    while True:
        groups = _pack(sizes, elem_bytes * (block_size + chunk), scratch, budget_bytes)
        if groups is not None and (best is None or len(groups) < len(best[2])):
            best = (chunk, len(groups), groups)
        if chunk == 1:
            break
        chunk //= 2
    if best is None:
        need = elem_bytes * (block_size + 1) * biggest + scratch
        raise ObertError(f"the Fisher blocks of one layer need {_size(need)} but only "
                         f"{_size(budget_bytes)} is available; lower --fisher-block-size "
                         "or raise --max-memory")
    chunk, _, groups = best
    return MemoryPlan(groups, elem_bytes * total * block_size, elem_bytes * total * chunk,
                      scratch, chunk, budget_bytes)


def _pack(sizes: list[int], per_weight: int, scratch: int, budget: int) -> list[list[int]] | None:
    """Greedy in-order packing of modules into passes of at most ``budget`` bytes (None: no fit)."""
    if per_weight * max(sizes) + scratch > budget:
        return None
    groups: list[list[int]] = [[]]
    used = scratch
    for i, d in enumerate(sizes):
        if groups[-1] and used + per_weight * d > budget:
            groups.append([])
            used = scratch
        groups[-1].append(i)
        used += per_weight * d
    return groups


def gradient_batches(data, batch_size: int):
    """``seed -> iterator`` of shuffled training mini-batches, as the Fisher collection wants
    (``data``: anything with ``loader(batch_size, shuffle=, seed=)``, e.g. ``tasks.data.Encoded``)."""
    return lambda seed: iter(data.loader(batch_size, shuffle=True, seed=seed))


def batch_stream(loader_factory: Callable[[int], Iterator], num: int, seed: int) -> Iterator:
    """``num`` batches, reshuffling (with seeds derived from ``seed``) when the data runs out."""
    epoch = 0
    done = 0
    while done < num:
        for batch in loader_factory(seed + 1000 * epoch):
            yield batch
            done += 1
            if done == num:
                return
        epoch += 1


@dataclass
class FisherResult:
    """Inverse Fisher blocks per target name (in memory or spilled to a temporary directory).

    ``get`` returns blocks on ``device`` (the model's), also those that waited on disk.
    """

    finv: dict[str, Tensor] = field(default_factory=dict)
    spilled: dict[str, Path] = field(default_factory=dict)
    # Kept un-inverted (``collect_fisher(damp=None)``): the Gram sums ``G_b^T G_b`` per target,
    # inverted into ``finv`` by ``use_damping`` with each damping tried.
    grams: dict[str, Tensor] = field(default_factory=dict)
    num_grads: int = 0
    damping: float | None = None  # the relative damping of ``finv`` when ``grams`` are kept
    damping_absolute: float | None = None  # that damping as lambda
    grad_seconds: float = 0.0
    fisher_seconds: float = 0.0  # Gram accumulation + inversion
    invert_seconds: float = 0.0  # the inversion part of fisher_seconds
    plan: MemoryPlan | None = None
    device: torch.device | None = None  # where ``get`` puts spilled blocks (None: CPU)
    _tmp: tempfile.TemporaryDirectory | None = None

    def get(self, name: str) -> Tensor:
        if name in self.finv:
            return self.finv[name]
        return torch.load(self.spilled[name], weights_only=True, map_location=self.device)

    def fisher_scale(self) -> float:
        """The mean diagonal of the empirical Fisher over every kept block: ``mean_q g_q^2``."""
        total = sum(float(g.diagonal(dim1=-2, dim2=-1).double().sum()) for g in self.grams.values())
        count = sum(g.shape[0] * g.shape[1] for g in self.grams.values())
        return total / max(count, 1) / max(self.num_grads, 1)

    def use_damping(self, relative: float) -> None:
        """Invert the kept Gram blocks with one damping for all of them,
        ``lambda = relative * fisher_scale()``: a fixed damping in units of the gradients' scale
        (scaling each block by its own mean diagonal instead measured worse on MiniLM at every
        ratio tried: docs/benchmarks.md, "Choosing the damping")."""
        if not self.grams:
            raise ObertError("this Fisher estimate was inverted with a fixed damping")
        t0 = time.perf_counter()
        self.finv.clear()  # one set of inverses at a time
        lam = max(relative * self.fisher_scale(), torch.finfo(torch.float32).tiny)
        for name, gram in self.grams.items():
            self.finv[name] = invert_fisher(gram.clone(), self.num_grads, lam)
        self.damping = relative
        self.damping_absolute = lam
        self.invert_seconds += time.perf_counter() - t0
        self.fisher_seconds += time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        return {"grad_seconds": self.grad_seconds, "fisher_seconds": self.fisher_seconds,
                "invert_seconds": self.invert_seconds}

    def close(self) -> None:
        self.finv.clear()
        self.grams.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def task_loss(model: nn.Module, batch: dict, device: torch.device) -> Tensor:
    """The task loss of one mini-batch (a masked-LM head only where the loss reads it)."""
    with labelled_positions_only(model):
        return model(**{k: v.to(device) for k, v in batch.items()}).loss


@contextlib.contextmanager
def gradients_of(model: nn.Module, targets: list[Target]) -> Iterator[None]:
    """The model with dropout off (``eval()``) and gradients on the target weights only, as the
    gradient stream wants it; its mode, ``requires_grad`` flags and the targets' ``.grad`` are
    restored afterwards."""
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    target_weights = {id(t.module.weight) for t in targets}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in target_weights)
        yield
    finally:
        for t in targets:
            t.module.weight.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def gradient_chunks(model: nn.Module, targets: list[Target], masks: MaskSet, batches: Iterable[dict],
                    members: list[int], sizes: list[int], chunk: int, dtype: torch.dtype,
                    device: torch.device, times: dict[str, float]) -> Iterator[dict[int, Tensor]]:
    """The gradient stream: one row per mini-batch of ``batches`` for each target in
    ``members``, its weight's gradient masked (pruned weights contribute nothing), flattened and
    zero-padded to ``sizes[i]``; yielded ``chunk`` rows at a time (the last chunk may be shorter)
    as ``{target index: [rows, size]}``. The rows live in buffers reused for the next chunk: an
    estimator consumes them before asking for more. Run inside ``gradients_of``; the time spent
    on forward and backward passes is added to ``times["grad_seconds"]``."""
    bufs = {i: torch.zeros(chunk, sizes[i], dtype=dtype, device=device) for i in members}
    filled = 0
    for batch in batches:
        t0 = time.perf_counter()
        for t in targets:
            t.module.weight.grad = None
        task_loss(model, batch, device).backward()
        for i in members:
            t = targets[i]
            g = t.module.weight.grad * masks.masks[t.name]
            bufs[i][filled, : t.numel] = g.reshape(-1)
        filled += 1
        times["grad_seconds"] += time.perf_counter() - t0
        if filled == chunk:
            yield {i: b[:filled] for i, b in bufs.items()}
            filled = 0
    if filled:
        yield {i: b[:filled] for i, b in bufs.items()}


def collect_fisher(model: nn.Module, targets: list[Target], masks: MaskSet,
                   loader_factory: Callable[[int], Iterator], *, num_grads: int, block_size: int,
                   damp: float | None, seed: int = 0, max_memory_gb: float | None = None,
                   woodbury: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print) -> FisherResult:
    """Inverse damped empirical Fisher blocks of every target from ``num_grads`` mini-batch gradients.

    The block-Fisher estimator on the gradient stream (``gradient_chunks``): gradients are taken
    with dropout off, only for the target weights, and masked so already-pruned weights
    contribute nothing. ``loader_factory(seed)`` yields mini-batches (dicts with ``labels``) in a
    seed-determined order. Targets whose blocks do not fit the memory budget together are done in
    several passes over the same batches.

    On several processes (DDP) the ``num_grads`` batches of that order are dealt round-robin to
    the ranks; each accumulates its share of ``G_b^T G_b`` and the sums are all-reduced before
    inversion, so every rank inverts the same Fisher a single process would.

    ``damp=None``: keep the Gram sums instead of inverting them (``FisherResult.use_damping``
    inverts them with a damping relative to each block; all of them and one set of inverses
    must fit the memory budget at once).

    ``woodbury``: build each inverse by WoodFisher's rank-one recursion instead
    (``StreamingWoodbury``; the same matrix up to rounding). Its partial results cannot be
    summed, so on several processes every rank takes all ``num_grads`` batches.
    """
    device = next(model.parameters()).device
    # float64 models (exactness tests) keep float64 Fisher blocks; everything else uses float32.
    dtype = torch.float64 if targets[0].module.weight.dtype == torch.float64 else torch.float32
    world, my_rank = process_group()  # gradients are dealt across ranks only when they can be summed
    deal = world if not woodbury else 1
    sizes = [padded_size(t.numel, block_size) for t in targets]
    budget = int(max_memory_gb * GiB) if max_memory_gb else int(0.8 * available_memory(device))
    keep = damp is None
    if keep and woodbury:
        raise ObertError("WoodFisher's recursion builds the inverse with its damping: give a "
                         "fixed --damp")
    # Kept Gram blocks and their inverses live together: plan with twice the block memory.
    plan = plan_memory(sizes, block_size, num_grads, budget // (2 if keep else 1),
                       elem_bytes=dtype.itemsize)
    if keep and len(plan.groups) > 1:
        raise ObertError(f"--damp auto keeps the Fisher blocks and their inverses in memory "
                         f"({_size(2 * plan.fisher_bytes)}), more than the budget of "
                         f"{_size(budget)}: give a fixed --damp, or raise --max-memory")
    progress = progress and my_rank == 0  # one progress bar and one log line per job, not per rank
    if my_rank == 0:
        log(f"[obert] {plan.describe()}")
    result = FisherResult(plan=plan, device=device)
    if len(plan.groups) > 1:
        result._tmp = scratch_dir("finv")
    times = {"grad_seconds": 0.0}
    with gradients_of(model, targets):
        for gi, group in enumerate(plan.groups):
            accs = {i: StreamingWoodbury(sizes[i], block_size, damp, num_grads, dtype=dtype,
                                         device=device) if woodbury else
                    StreamingFisher(sizes[i], block_size, damp or 1.0, dtype=dtype, device=device)
                    for i in group}
            desc = "gradients" + (f" (pass {gi + 1}/{len(plan.groups)})" if len(plan.groups) > 1 else "")
            first = my_rank if deal > 1 else 0
            batches = itertools.islice(batch_stream(loader_factory, num_grads, seed), first, None, deal)
            mine = len(range(first, num_grads, deal))
            batches = tqdm(batches, total=mine, desc=desc, disable=not progress, leave=False)
            for rows in gradient_chunks(model, targets, masks, batches, group, sizes, plan.chunk,
                                        dtype, device, times):
                t1 = time.perf_counter()
                for i, g in rows.items():
                    accs[i].update(g)
                result.fisher_seconds += time.perf_counter() - t1
            t1 = time.perf_counter()
            if deal > 1:
                for acc in accs.values():
                    all_reduce_sum(acc.gram)
                    acc.num_grads = num_grads
            t2 = time.perf_counter()
            for i in tqdm(group, desc="invert Fisher blocks", disable=not progress or keep, leave=False):
                name = targets[i].name
                if keep:
                    result.grams[name] = accs.pop(i).gram
                    result.num_grads = num_grads
                    continue
                finv = accs.pop(i).inverse()
                if result._tmp is not None:
                    path = Path(result._tmp.name) / f"{i}.pt"
                    torch.save(finv.cpu(), path)
                    result.spilled[name] = path
                else:
                    result.finv[name] = finv
            result.fisher_seconds += time.perf_counter() - t1
            result.invert_seconds += time.perf_counter() - t2
    result.grad_seconds = times["grad_seconds"]
    return result
