"""Writing results atomically: everything goes to a temporary sibling, then one rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``.

    On any error the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(f.name, path)


def save_model_dir(out: str | Path, model, tokenizer, extra: dict[str, dict] | None = None,
                   hook: Callable[[Path], None] | None = None) -> Path:
    """Save a Hugging Face model directory (safetensors) plus JSON files, atomically.

    ``hook(folder)`` may add more files to the directory before it takes its final name.
    """
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        if hook is not None:
            hook(tmp)
    return Path(out)
