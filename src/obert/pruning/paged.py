"""The M-FAC estimator for pruning: the m gradients of every target kept (paged to disk), and per
Fisher block of B weights (B far larger than oBERT's: thousands of weights, or a whole layer) the
factor ``V`` of ``F^-1 = (I - V^T V) / damp`` (``obert.core.mfac.MFAC``).

Gradients arrive a few at a time and are written row by row to one memory-mapped file per target
(``[m, d]``, float32; the page cache keeps them in memory where it can). The precomputation then
reads a few blocks' columns at a time, overwrites them with ``V`` and keeps only the curvature a
saliency needs (the diagonal of ``F^-1``, or its ``g x g`` group blocks) in memory. The update
reads ``V`` back the same way. Memory: a chunk of blocks (``4 m B`` numbers each, at least one);
disk: ``m d`` numbers for all targets, checked before any gradient is taken.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from obert.core.mfac import MFAC
from obert.device import GiB, available_memory
from obert.errors import ObertError
from obert.io import scratch_dir
from obert.model.masks import MaskSet
from obert.model.targets import Target
from obert.pruning.fisher import _size, batch_stream, gradient_chunks, gradients_of, padded_size


def blocks_per_chunk(num_grads: int, block_size: int, budget_bytes: int, elem_bytes: int = 4) -> int:
    """How many Fisher blocks one precomputation step holds: gradients, their block-major copy,
    ``V`` and scratch (``4 m B`` numbers per block). Raises when one block does not fit."""
    per_block = 4 * num_grads * block_size * elem_bytes + 2 * num_grads * num_grads * elem_bytes
    if per_block > budget_bytes:
        raise ObertError(f"one M-FAC block of {block_size} weights and {num_grads} gradients needs "
                         f"{_size(per_block)} but only {_size(budget_bytes)} is available: lower "
                         "--fisher-block-size or --num-grads, or raise --max-memory")
    return max(1, budget_bytes // per_block)


def _column_chunks(width: int, step: int) -> Iterator[slice]:
    return (slice(c, min(c + step, width)) for c in range(0, width, step))


def _block_major(rows: Tensor, block_size: int) -> Tensor:
    """``[m, nb * B]`` gradient (or ``V``) columns as ``[nb, m, B]``, one matrix per block."""
    return rows.reshape(rows.shape[0], -1, block_size).transpose(0, 1)


@dataclass
class PagedMFAC:
    """Per target: ``V`` of every Fisher block on disk (``[m, d]``, column block b = block b) and
    the curvature of its saliencies in memory (``curvature[name]``: ``[d]`` diagonal of ``F^-1``
    for single weights, ``[d // g, g, g]`` group blocks otherwise)."""

    damp: float
    num_grads: int
    dtype: torch.dtype = torch.float32  # float64 for float64 models (exactness tests)
    device: torch.device = torch.device("cpu")  # where the block algebra runs
    files: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # padded to whole blocks
    blocks: dict[str, int] = field(default_factory=dict)  # B, or the whole layer where smaller
    chunk_blocks: dict[str, int] = field(default_factory=dict)  # blocks per precomputation step
    curvature: dict[str, Tensor] = field(default_factory=dict)
    grad_seconds: float = 0.0
    fisher_seconds: float = 0.0
    _tmp: tempfile.TemporaryDirectory | None = None

    def _map(self, name: str, mode: str = "r+") -> np.memmap:
        return np.memmap(self.files[name], dtype=np.float64 if self.dtype == torch.float64 else np.float32,
                         mode=mode,
                         shape=(self.num_grads, self.sizes[name]))

    def chunks(self, name: str) -> Iterator[tuple[slice, MFAC]]:
        """``(columns, MFAC of those blocks, batched [nb, m, B])`` over the target, a chunk of
        blocks at a time."""
        mm = self._map(name, "r")
        bsz = self.blocks[name]
        for cols in _column_chunks(self.sizes[name], self.chunk_blocks[name] * bsz):
            v = torch.from_numpy(np.array(mm[:, cols])).to(self.device)
            yield cols, MFAC.from_factor(_block_major(v, bsz).contiguous(), self.damp)
        del mm

    def timings(self) -> dict[str, float]:
        return {"grad_seconds": self.grad_seconds, "fisher_seconds": self.fisher_seconds}

    def close(self) -> None:
        self.curvature.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def collect_mfac(model: nn.Module, targets: list[Target], masks: MaskSet,
                 loader_factory: Callable[[int], Iterator], *, num_grads: int, block_size: int,
                 damp: float, group_size: int = 1, seed: int = 0,
                 max_memory_gb: float | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> PagedMFAC:
    """The M-FAC estimate of every target from ``num_grads`` mini-batch gradients (the gradient
    stream of ``collect_fisher``: dropout off, pruned weights masked), paged as described in the
    module docstring. Every process takes all ``num_grads`` batches (the rows are not sums)."""
    device = next(model.parameters()).device
    dtype = torch.float64 if targets[0].module.weight.dtype == torch.float64 else torch.float32
    blocks = [min(block_size, t.numel) for t in targets]
    sizes = [padded_size(t.numel, b) for t, b in zip(targets, blocks)]
    budget = int(max_memory_gb * GiB) if max_memory_gb else int(0.8 * available_memory(device))
    result = PagedMFAC(damp, num_grads, dtype, device)
    for t, b, n in zip(targets, blocks, sizes):
        result.blocks[t.name], result.sizes[t.name] = b, n
        result.chunk_blocks[t.name] = blocks_per_chunk(num_grads, b, budget, dtype.itemsize)
    tmp = scratch_dir("mfac")
    result._tmp = tmp
    disk = dtype.itemsize * num_grads * sum(sizes)
    free = shutil.disk_usage(tmp.name).free
    if disk > 0.9 * free:
        result.close()
        raise ObertError(f"the M-FAC gradients need {_size(disk)} on disk in {Path(tmp.name).parent}, "
                         f"{_size(free)} free: lower --num-grads (or point TMPDIR elsewhere)")
    log(f"[obert] M-FAC: {num_grads} gradients of {sum(sizes):,} weights paged to disk "
        f"({_size(disk)}), blocks of up to {block_size}")
    maps = {}
    for i, t in enumerate(targets):
        result.files[t.name] = Path(tmp.name) / f"{i}.bin"
        maps[t.name] = result._map(t.name, "w+")
    # Gradient rows are buffered a few at a time (bounded by an eighth of the budget).
    rows_at_once = max(1, min(16, num_grads, budget // max(1, 8 * dtype.itemsize * sum(sizes))))
    times = {"grad_seconds": 0.0}
    written = 0
    with gradients_of(model, targets):
        batches = tqdm(itertools.islice(batch_stream(loader_factory, num_grads, seed), num_grads),
                       total=num_grads, desc="gradients", disable=not progress, leave=False)
        for rows in gradient_chunks(model, targets, masks, batches, list(range(len(targets))), sizes,
                                    rows_at_once, dtype, device, times):
            k = next(iter(rows.values())).shape[0]
            for i, g in rows.items():
                maps[targets[i].name][written:written + k] = g.cpu().numpy()
            written += k
    result.grad_seconds = times["grad_seconds"]
    t0 = time.perf_counter()
    for t in tqdm(targets, desc="M-FAC blocks", disable=not progress, leave=False):
        mm = maps.pop(t.name)
        bsz = result.blocks[t.name]
        parts = []
        for cols in _column_chunks(mm.shape[1], result.chunk_blocks[t.name] * bsz):
            g = torch.from_numpy(np.array(mm[:, cols])).to(device)
            f = MFAC(_block_major(g, bsz), damp)
            mm[:, cols] = f.v.transpose(0, 1).reshape(num_grads, -1).cpu().numpy()
            parts.append(f.diag().reshape(-1) if group_size == 1 else
                         f.group_blocks(group_size).reshape(-1, group_size, group_size))
        mm.flush()
        del mm
        result.curvature[t.name] = torch.cat(parts)
    result.fisher_seconds = time.perf_counter() - t0
    return result
