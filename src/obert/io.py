"""Writing results safely: outputs are checked before any work, written to a temporary sibling,
then put in place with one rename.

An output directory obert wrote carries a marker file (``MARKER``); only such a directory may be
replaced, and only when the caller says so (``overwrite=True``, the CLI's ``--overwrite``).
Anything else that already exists at the output path (a file, a symbolic link, a directory with
content obert did not write, the working directory, a directory holding one of the run's inputs)
is refused before any work starts, so a mistyped ``--out`` never deletes a user's data.

Temporary directories are named ``.NAME.obert-tmp-HOST-PID-TOKEN``: they are removed on every
exit path Python sees (errors, Ctrl-C, SIGTERM through the CLI), and the next write next to the
same output removes those a killed process (``kill -9``) left behind. Files and directories get
the permissions the umask gives, like any file the user creates.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from obert.errors import ObertError

MARKER = ".obert_output"
_TMP, _OLD = "obert-tmp", "obert-old"


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def _local_inputs(inputs: Iterable[str | Path | None]) -> Iterator[tuple[str | Path, Path]]:
    """``(as given, resolved)`` for each input that is a local path (hub ids and None skipped)."""
    for item in inputs:
        if item is not None and Path(item).expanduser().exists():
            yield item, Path(item).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (),
                 overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse an output path that would destroy something; returns it. Call before any work.

    Allowed: a path that does not exist (in a writable place), an empty directory, or a
    directory obert wrote earlier (its ``MARKER``) when ``overwrite``. Refused: a file, a symbolic
    link, any other non-empty directory, the working directory or a directory above it, and a
    path that is or contains one of ``inputs`` (local paths; hub ids are ignored). Returns the
    path with ``~`` expanded (a quoted ``~/x`` must not become a directory named ``~``).
    """
    out = Path(out).expanduser()
    where = f"{option} {out}"
    try:
        return _check_output(out, where, inputs, overwrite)
    except OSError as exc:  # e.g. a directory on the way that this user may not enter
        raise ObertError(f"{where}: {exc.strerror or exc}") from None


def _check_output(out: Path, where: str, inputs, overwrite: bool) -> Path:
    if out.is_symlink():
        raise ObertError(f"{where} is a symbolic link: give a new directory path")
    real = out.resolve()
    if _contains(real, Path.cwd().resolve()):
        raise ObertError(f"{where} is the working directory or contains it: give a new directory")
    for item, resolved in _local_inputs(inputs):
        if _contains(real, resolved):
            raise ObertError(f"{where} would replace the input {item}: write to a new directory")
    if out.exists():
        if not out.is_dir():
            raise ObertError(f"{where} is an existing file: give a new directory path")
        if (out / MARKER).is_file():
            if not overwrite:
                raise ObertError(f"{where} holds an earlier obert output: pass --overwrite to "
                                 "replace it, or choose a new directory")
        elif any(out.iterdir()):
            raise ObertError(f"{where} is a non-empty directory obert did not write: give a new "
                             "directory (obert replaces only its own outputs, with --overwrite)")
    _check_writable(out.parent, where)
    return out


def check_file_output(path: str | Path, *, inputs: Iterable[str | Path | None] = (),
                      overwrite: bool = False, option: str = "--out") -> Path:
    """Like ``check_output`` for a single file: an existing file is replaced only with
    ``overwrite``; a directory, a symbolic link or a path inside an input is refused."""
    path = Path(path).expanduser()
    where = f"{option} {path}"
    if path.is_symlink() or path.is_dir():
        raise ObertError(f"{where} is a {'symbolic link' if path.is_symlink() else 'directory'}: "
                         "give a file path")
    real = path.resolve()
    for item, resolved in _local_inputs(inputs):
        if _contains(resolved, real):
            raise ObertError(f"{where} lies in the input {item}: write it elsewhere")
    if path.exists() and not overwrite:
        raise ObertError(f"{where} exists: pass --overwrite to replace it")
    _check_writable(path.parent, where)
    return path


def _check_writable(parent: Path, where: str) -> None:
    """Probe the nearest existing ancestor with a real mkdir (``os.access`` says yes to root)."""
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise ObertError(f"{where}: {base} is not a directory")
    probe = base / f".obert-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ObertError(f"{where}: cannot write in {base} ({os.strerror(exc.errno or errno.EACCES)})") from None


def _stamp() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(host: str, pid: str) -> bool:
    """Whether process ``pid`` was one of this host's and no longer runs (its files are stale)."""
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by killed processes on this host; returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in (_TMP, _OLD):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            host, pid, _ = (p.name[len(f".{out.name}.{kind}-"):].rsplit("-", 2) + ["", ""])[:3]
            if _gone(host, pid):  # the name is .NAME.KIND-HOST-PID-TOKEN[.SUFFIX]
                if kind == _OLD and not out.exists():  # killed between its two renames
                    os.replace(p, out)
                elif p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def scratch_dir(kind: str):
    """A ``tempfile.TemporaryDirectory`` named ``obert-KIND-HOST-PID-TOKEN*`` in the system's
    temporary directory, for large scratch files (paged gradients, spilled Fisher blocks). The
    ones of the same kind left by processes of this host that no longer run (``kill -9`` skips
    every cleanup) are removed first: they can hold gigabytes."""
    import tempfile

    base = Path(tempfile.gettempdir())
    for old in base.glob(f"obert-{kind}-*"):
        host, pid, _ = (old.name[len(f"obert-{kind}-"):].rsplit("-", 2) + ["", ""])[:3]
        if _gone(host, pid) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"obert-{kind}-{_stamp()}")


@contextmanager
def claim_output(out: str | Path) -> Iterator[Path]:
    """Hold ``.NAME.obert-lock`` next to ``out`` while a run works towards it, so a second run
    aimed at the same output is refused when it starts rather than after its work. A lock left
    by a killed process on this host is taken over."""
    out = Path(out).expanduser()
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.obert-lock"
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            try:
                holder_host, _, pid = lock.read_text().strip().rpartition("-")
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if _gone(holder_host, pid):
                lock.unlink(missing_ok=True)
                continue
            holder = f"process {pid}" + ("" if holder_host in (host, "") else f" on {holder_host}")
            raise ObertError(f"another obert run ({holder if pid else 'starting'}) is writing "
                             f"{out}: wait for it, or remove {lock} if it is gone") from None
    else:
        raise ObertError(f"cannot take the lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(f"{host}-{os.getpid()}\n")
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)
        for p in created if not out.exists() else []:  # a failed run leaves no empty parents
            try:
                p.rmdir()
            except OSError:
                break


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it becomes ``out``.

    ``out`` is checked again when the work is done (``check_output`` rules, without inputs): an
    obert output there is replaced only with ``overwrite``. On any error, interrupt included,
    the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.{_TMP}-{_stamp()}"
    old = out.parent / f".{out.name}.{_OLD}-{_stamp()}"
    tmp.mkdir()  # honours the umask, where tempfile.mkdtemp always gives 0700
    try:
        yield tmp
        write_json(tmp / MARKER, {"written_by": "obert"})
        apply_umask(tmp)
        try:
            check_output(out, overwrite=overwrite)  # again: hours may have passed since the start
        except ObertError as exc:  # keep the finished work rather than lose it
            kept = out.parent / f".{out.name}.obert-kept-{_stamp()}"
            os.replace(tmp, kept)
            raise ObertError(f"{exc} (the finished result is kept in {kept})") from None
        if out.exists():
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():  # interrupted between the two renames
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes the umask gives new files and directories
    (some writers, such as tempfile-based ones, always create 0600)."""
    mask = current_umask()
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success it replaces ``path``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / f".{path.name}.{_TMP}-{_stamp()}{path.suffix}"  # writers go by suffix
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    with atomic_file(path) as tmp:
        with open(tmp, "x") as f:  # plain open: the umask sets the permissions
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")


def save_model_dir(out: str | Path, model, tokenizer, extra: dict[str, dict | str] | None = None,
                   hook: Callable[[Path], None] | None = None, *, overwrite: bool = False) -> Path:
    """Save a Hugging Face model directory (safetensors) plus files, atomically: ``extra`` maps
    file names to JSON data (a dict) or text (a str, e.g. the model card).

    ``hook(folder)`` may add more files to the directory before it takes its final name.
    """
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra or {}).items():
            if isinstance(data, str):
                (tmp / name).write_text(data, encoding="utf-8")
            else:
                write_json(tmp / name, data)
        if hook is not None:
            hook(tmp)
    return Path(out)
