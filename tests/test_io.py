"""Scratch directories for large temporary files (obert.io.scratch_dir)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from obert.io import scratch_dir


def test_scratch_dirs_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A scratch directory of a process that no longer runs goes when the next one is made;
    those of live processes (this one) and of other hosts stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    host = socket.gethostname()
    dead = tmp_path / f"obert-mfac-{host}-{done.stdout.strip()}-abcd1234xyz"
    alive = tmp_path / f"obert-mfac-{host}-{os.getpid()}-abcd1234xyz"
    other = tmp_path / f"obert-mfac-elsewhere-{done.stdout.strip()}-abcd1234xyz"
    finv = tmp_path / f"obert-finv-{host}-{done.stdout.strip()}-abcd1234xyz"
    for d in (dead, alive, other, finv):
        d.mkdir()
        (d / "0.bin").write_bytes(b"x" * 10)
    tmp = scratch_dir("mfac")
    assert Path(tmp.name).parent == tmp_path and Path(tmp.name).name.startswith(f"obert-mfac-{host}-{os.getpid()}-")
    assert not dead.exists() and alive.exists() and other.exists() and finv.exists()
    tmp.cleanup()
