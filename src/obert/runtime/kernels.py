"""The native sparse kernels: built once from ``csrc/`` with the installed PyTorch, or a fallback.

``load()`` compiles ``csrc/sparse_linear.cpp`` with ``torch.utils.cpp_extension`` (``-O3
-march=native``: vector FMAs for this CPU's ISA) into ``~/.cache/obert/ext-<hash>`` the first time
(the hash covers the CPU's feature flags, so machines sharing the cache never share a build),
and imports it afterwards (``make setup`` runs ``obert.runtime.kernels.build()`` so nothing
compiles on first use). Where no compiler is available it returns ``None`` and
``SparseLinear`` falls back to ``csr_linear``, PyTorch's CSR matmul (correct, not fast);
``native_available()`` says which one runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).with_name("csrc")
SOURCES = ["sparse_linear.cpp", "attention.cpp", "layer_norm.cpp"]


def cpu_identity() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags (``/proc/cpuinfo``; elsewhere what
    ``platform`` says, with no flags)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = frozenset(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return model, flags


def _build_dir() -> Path:
    """Where this build lives: keyed by the sources, torch, Python and the CPU's features, since
    ``-march=native`` code built on an AVX-512 machine dies (SIGILL) on an AVX2-only one that
    shares the cache directory."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):  # sources and headers
        h.update(path.name.encode() + path.read_bytes())
    h.update(f"{torch.__version__}-{sys.version_info[:2]}-{platform.machine()}".encode())
    model, flags = cpu_identity()
    h.update(f"{model}|{' '.join(sorted(flags))}".encode())
    base = Path(os.environ.get("OBERT_CACHE", Path.home() / ".cache" / "obert"))
    return base / f"ext-{h.hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False):
    """The compiled extension module, or ``None`` when it cannot be built here."""
    if os.environ.get("OBERT_NO_NATIVE"):
        return None
    from torch.utils import cpp_extension

    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
    try:
        return cpp_extension.load(name="obert_sparse", sources=[str(CSRC / s) for s in SOURCES],
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=str(build), verbose=verbose)
    except Exception as exc:  # no compiler, no ninja, unsupported platform: use the fallback
        print(f"[obert] native sparse kernels unavailable ({str(exc).splitlines()[0][:200]}); "
              "using the PyTorch fallback", file=sys.stderr)
        return None


def native_available() -> bool:
    return load() is not None


def csr_linear(x: Tensor, weight_csr: Tensor, bias: Tensor | None) -> Tensor:
    """The fallback: ``x @ W^T + b`` through PyTorch's CSR matmul (correct, not fast)."""
    y = torch.sparse.mm(weight_csr, x.t().contiguous()).t()
    return y + bias if bias is not None else y.contiguous()


def build() -> None:
    """Build now and say which kernels run (``make setup`` calls this)."""
    ok = load() is not None
    print(f"obert sparse kernels: {'native (' + str(_build_dir()) + ')' if ok else 'PyTorch fallback'}")
