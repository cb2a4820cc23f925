"""The native kernels: one portable build carrying every x86 instruction-set path, chosen at run
time; or a fallback where nothing can be built. The sparse runtime's kernels (``obert.runtime``)
and the batched small-matrix kernels of the Fisher inverses (``obert.core.batched``) live in the
one extension; this module builds and loads it and uses no other part of obert but its errors.

``load()`` compiles ``csrc/`` with the installed PyTorch the first time (``make setup`` runs
``build()`` so nothing compiles on first use): ``csrc/isa.cpp`` once per instruction set, each
object with its own target flags (``ISA_FLAGS``; a set the compiler does not know is left out),
and the PyTorch glue ``csrc/binding.cpp`` with the platform's baseline flags, linked into one
extension in ``~/.cache/obert/ext-<hash>`` (the hash covers the sources, the compiler, torch and
Python; no ``-march=native``, so a build made on one x86-64 machine runs on any other). Which
kernels run is decided per call from ``isa()``: the best set this CPU runs (cpuid, checked by the
extension itself), or the one the environment variable ``OBERT_ISA`` names, to test or measure a
lower path (``OBERT_ISA=avx2`` on an AVX-512 machine). Other architectures build the generic path.
Where no compiler is available ``load()`` returns ``None`` and every caller falls back to PyTorch
(``SparseLinear`` to a CSR matmul: correct, not fast); ``native_available()`` says which runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from obert.errors import ObertError

CSRC = Path(__file__).with_name("csrc")
ISA_ENV = "OBERT_ISA"
# Output rows per block of the sparse segment layout: part of the saved compiled format
# (``linear.pack_weight``), and given to the C++ build (-DOBERT_ROWS), which has no copy of its own.
ROWS = 16
# Target flags of each instruction set's kernel object, lowest first (x86-64; elsewhere only
# "generic" is built, with the platform's baseline flags). Exactly the features the extension
# checks before it runs a path (binding.cpp: cpu_runs): no BMI, F16C, ... that some CPUs and VMs
# with AVX2 lack.
_AVX2 = ["-mavx2", "-mfma"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
ISA_FLAGS: dict[str, list[str]] = {
    "generic": [],
    "avx2": _AVX2,
    "avxvnni": _AVX2 + ["-mavxvnni"],
    "avx512": _AVX512,
    "avx512_vnni": _AVX512 + ["-mavx512vnni"],
}
_LAYOUT = [f"-DOBERT_ROWS={ROWS}"]
_COMMON = ["-O3", "-fPIC", "-std=gnu++17", "-fno-math-errno", "-ffp-contract=fast",
           "-fvisibility=hidden", *_LAYOUT]


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


def _compiler() -> str:
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "get_cxx_compiler", None)
    return get() if get else os.environ.get("CXX", "c++")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=1)
def _compiler_version() -> bytes:
    """What ``c++ --version`` says (asked once per process: every compile's cache key needs it)."""
    try:
        return subprocess.run([_compiler(), "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _build_dir() -> Path:
    """Where this build lives: keyed by the sources, the compiler, torch and Python (not by the
    CPU: the build is the same on every machine of the architecture)."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):  # sources and headers
        h.update(path.name.encode() + path.read_bytes())
    h.update(f"{torch.__version__}-{sys.version_info[:2]}-{platform.machine()}-{_COMMON}-"
             f"{sorted(ISA_FLAGS.items())}".encode())
    h.update(_compiler_version())
    base = Path(os.environ.get("OBERT_CACHE", Path.home() / ".cache" / "obert"))
    return base / f"ext-{h.hexdigest()[:16]}"


def _compile_isa(name: str, build: Path) -> Path | None:
    """``isa_<name>.o`` in ``build`` (written under a temporary name, then renamed), or None when
    the compiler cannot build that path (said once, and remembered in ``isa_<name>.failed`` so
    later processes do not try again)."""
    obj, failed = build / f"isa_{name}.o", build / f"isa_{name}.failed"
    if obj.is_file():
        return obj
    if failed.is_file() and name != "generic":
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".isa_{name}.", suffix=".o", dir=build)
    os.close(fd)
    cmd = [_compiler(), *_COMMON, f"-DOBERT_ISA={name}", *ISA_FLAGS[name], "-c",
           str(CSRC / "isa.cpp"), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        error = (done.stderr.strip().splitlines() or ["failed"])[-1][:300]
        if name == "generic":
            raise RuntimeError(f"compiling the kernels failed: {error}")
        failed.write_text(done.stderr)
        print(f"[obert] the {name} kernel path is not built ({error}); the others are",
              file=sys.stderr)
        return None
    os.replace(tmp, obj)
    return obj


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False):
    """The compiled extension module, or ``None`` when it cannot be built here."""
    if os.environ.get("OBERT_NO_NATIVE"):
        return None
    from torch.utils import cpp_extension

    build = _build_dir()
    names = list(ISA_FLAGS) if _is_x86() else ["generic"]
    try:
        build.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            objects = dict(zip(names, pool.map(lambda n: _compile_isa(n, build), names)))
        built = [n for n, o in objects.items() if o is not None]
        return cpp_extension.load(
            name="obert_sparse", sources=[str(CSRC / "binding.cpp")],
            extra_cflags=["-O3", "-fopenmp", *_LAYOUT,
                          *[f"-DOBERT_HAVE_{n}" for n in built if n != "generic"]],
            extra_ldflags=["-fopenmp", *[str(objects[n]) for n in built]],
            build_directory=str(build), verbose=verbose)
    except Exception as exc:  # no compiler, no ninja, unsupported platform: use the fallback
        print(f"[obert] native sparse kernels unavailable ({str(exc).splitlines()[0][:200]}); "
              "using the PyTorch fallback", file=sys.stderr)
        return None


def native_available() -> bool:
    return load() is not None


@functools.lru_cache(maxsize=8)
def _resolve_isa(forced: str | None) -> tuple[str, int]:
    ext = load()
    if ext is None:
        return "none", -1
    names = list(ext.available_isas())
    if not forced:
        return names[-1], len(names) - 1
    if forced not in names:
        known = ", ".join(ISA_FLAGS)
        raise ObertError(f"{ISA_ENV}={forced}: this CPU and build run {', '.join(names)} "
                         f"(kernel sets: {known})")
    return forced, names.index(forced)


def isa() -> str:
    """The instruction set the kernels run with: ``OBERT_ISA`` when set, else the best this CPU
    runs; ``"none"`` without native kernels."""
    return _resolve_isa(os.environ.get(ISA_ENV) or None)[0]


def isa_index() -> int:
    """``isa()`` as the extension's ``isa`` argument."""
    return _resolve_isa(os.environ.get(ISA_ENV) or None)[1]


def available_isas() -> list[str]:
    """The instruction sets this CPU runs in this build, lowest first (empty without one)."""
    ext = load()
    return [] if ext is None else list(ext.available_isas())


def build() -> None:
    """Build now and say which kernels run (``make setup`` calls this)."""
    ok = load() is not None
    print(f"obert native kernels: native, {isa()} of {', '.join(available_isas())} ({_build_dir()})"
          if ok else "obert native kernels: PyTorch fallback (slow: compile keeps layers dense)")
