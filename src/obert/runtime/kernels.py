"""The native sparse kernels: built once from ``csrc/`` with the installed PyTorch, or a fallback.

``load()`` compiles ``csrc/sparse_linear.cpp`` with ``torch.utils.cpp_extension`` (``-O3
-march=native``: vector FMAs for this CPU's ISA) into ``~/.cache/obert/ext-<hash>`` the first time,
and imports it afterwards (``make setup`` runs ``obert.runtime.kernels.build()`` so nothing
compiles on first use). Where no compiler is available it returns ``None`` and
``sparse_linear`` falls back to PyTorch's CSR matmul (correct, not fast); ``native_available()``
says which one runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).with_name("csrc")
SOURCES = ["sparse_linear.cpp"]


def _build_dir() -> Path:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__}-{sys.version_info[:2]}-{platform.machine()}".encode())
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


def sparse_linear(x: Tensor, row_ptr: Tensor, col: Tensor, val: Tensor, bias: Tensor | None,
                  out_features: int, group: int) -> Tensor:
    """``x [T, K] @ W^T + b`` with ``W`` in CSR (group 1) or block4 (group 4) form."""
    ext = load()
    if ext is not None:
        return ext.sparse_linear(x, row_ptr, col, val, bias, out_features, group)
    return _fallback(x, row_ptr, col, val, bias, out_features, group)


def _fallback(x, row_ptr, col, val, bias, out_features, group):
    if group == 4:  # expand blocks to single weights: k, k+1, k+2, k+3
        col = (col.long().unsqueeze(1) + torch.arange(4)).reshape(-1)
        row_ptr = row_ptr.long() * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        w = torch.sparse_csr_tensor(row_ptr.long(), col.long(), val.reshape(-1),
                                    size=(out_features, x.shape[1]))
    y = torch.sparse.mm(w, x.t().contiguous()).t()
    return y + bias if bias is not None else y.contiguous()


def build() -> None:
    """Build now and say which kernels run (``make setup`` calls this)."""
    ok = load() is not None
    print(f"obert sparse kernels: {'native (' + str(_build_dir()) + ')' if ok else 'PyTorch fallback'}")
