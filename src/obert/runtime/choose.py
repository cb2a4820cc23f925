"""Sparse or dense, per layer, by measurement on this CPU.

A sparse kernel beats dense torch by a margin that depends on the CPU (its vector width, load
ports and caches), the layer's shape and density, the kernel (float32, int8) and the thread
count, so ``compile`` times each candidate layer both ways on this machine (``measure``: a few
interleaved rounds, median of the per-round ratios) and keeps the loser dense. Results are
cached per CPU in ``~/.cache/obert/speed/`` (keyed by the CPU model and features, torch, the
kernel build and its instruction set, threads, tokens, shape, density and kernel), so the same
shapes are measured once per machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from obert import native as kernels

CHOICES = ("speed", "sparsity")  # measure per layer / sparse wherever the threshold is reached
DEFAULT_TOKENS = 256  # tokens per call the choice is measured at (16 x 128 and 1 x 128 agree)


def median_time(fn: Callable[[], object], iters: int) -> float:
    """Median seconds of ``iters`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Timing:
    """A layer timed both ways: ``speedup`` = dense time / sparse time (median of rounds)."""

    dense_ms: float
    sparse_ms: float
    speedup: float

    def as_dict(self) -> dict:
        return {"dense_ms": self.dense_ms, "sparse_ms": self.sparse_ms, "speedup": self.speedup}


@torch.no_grad()
def measure(linear: nn.Linear, sparse: nn.Module, tokens: int = DEFAULT_TOKENS, rounds: int = 5,
            iters: int = 3) -> Timing:
    """``linear`` (dense torch) against its sparse form on ``tokens`` random inputs, in
    interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, linear.in_features, generator=g)
    weight, bias = linear.weight.detach().float(), linear.bias
    dense_t, sparse_t = [], []
    for _ in range(rounds):
        dense_t.append(median_time(lambda: F.linear(x, weight, bias), iters))
        sparse_t.append(median_time(lambda: sparse(x), iters))
    return Timing(1e3 * statistics.median(dense_t), 1e3 * statistics.median(sparse_t),
                  statistics.median(d / s for d, s in zip(dense_t, sparse_t)))


def layer_key(sparse, tokens: int) -> str:
    """What a timing depends on besides the CPU: kernel path, threads, tokens, shape, density
    (to 1%), weight type and structure."""
    kind = "int8" if sparse.quantized else "fp32"
    return (f"{kernels.isa()}|threads={torch.get_num_threads()}|tokens={tokens}|"
            f"{sparse.out_features}x{sparse.in_features}|density={sparse.density:.2f}|{kind}|"
            f"group={sparse.group}")


def cache_path() -> Path:
    """This CPU's timing cache (one file per CPU model and features, torch and kernel build)."""
    model, flags = kernels.cpu_identity()
    key = f"{model}|{' '.join(sorted(flags))}|{torch.__version__}|{kernels._build_dir().name}"
    base = Path(os.environ.get("OBERT_CACHE", Path.home() / ".cache" / "obert"))
    return base / "speed" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


_FIELDS = ("dense_ms", "sparse_ms", "speedup")


def _read(path: Path) -> dict[str, dict]:
    """The cache's entries; an unreadable or malformed file counts as empty, and an entry
    without three positive finite numbers is left out."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}

    def valid(v) -> bool:
        return isinstance(v, dict) and all(
            isinstance(v.get(f), (int, float)) and not isinstance(v.get(f), bool)
            and math.isfinite(v[f]) and v[f] > 0 for f in _FIELDS)

    return {k: {f: float(v[f]) for f in _FIELDS} for k, v in data.items() if valid(v)}


def _write(path: Path, entries: dict[str, dict]) -> None:
    """Write atomically (temp file, rename); a cache that cannot be written is skipped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


class Chooser:
    """Times candidate layers (or reads the timing from this CPU's cache) for ``compile``."""

    def __init__(self, tokens: int = DEFAULT_TOKENS, cache: bool = True,
                 timer: Callable[[nn.Linear, nn.Module, int], Timing] = measure) -> None:
        self.tokens, self.timer = tokens, timer
        self.path = cache_path() if cache else None
        self.entries = _read(self.path) if self.path else {}
        self.new = False

    def timing(self, linear: nn.Linear, sparse) -> Timing:
        key = layer_key(sparse, self.tokens)
        if key not in self.entries:
            self.entries[key] = self.timer(linear, sparse, self.tokens).as_dict()
            self.new = True
        return Timing(*(self.entries[key][f] for f in _FIELDS))

    def save(self) -> None:
        if self.path and self.new:
            _write(self.path, {**_read(self.path), **self.entries})
