"""Checkpoints of ``obert train``: which one to resume from, and whether the recipe still fits.

A checkpoint is ``OUT.checkpoints/checkpoint-N/`` holding the Trainer's files (weights, optimizer,
scheduler, RNG, trainer state), obert's masks and histories, the recipe it was written under
(``RECIPE_FILE``) and, written last, the seal (``SEAL``). Before resuming, every file is read back
without unpickling anything (JSON and YAML parsed, safetensors read whole, PyTorch's zip
archives checked member by member against their CRCs); a damaged checkpoint is skipped for the
next older intact one, and the user is told which.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml

SEAL = "obert_complete"
HISTORY_FILE = "obert_history.json"
RECIPE_FILE = "obert_recipe.yaml"
TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
# Settings that may change between a run and its resumption: where it runs and how it reports.
RESUMABLE_CHANGES = frozenset({"training.device", "training.eval_batch_size",
                               "training.logging_steps"})
# Fields naming files: compared as the files they name, so ``data/x`` and ``./data/x`` agree.
PATH_FIELDS = frozenset({"model.path", "model.tokenizer", "data.train_file", "data.eval_file",
                         "distillation.teacher", "output_dir"})


def checkpoint_step(folder: Path) -> int:
    """The optimizer step in a checkpoint folder's name (``checkpoint-N``); -1 when it has none."""
    tail = folder.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


def sealed_checkpoints(folder: Path) -> list[Path]:
    """Complete (sealed) checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if (p / SEAL).is_file() and checkpoint_step(p) >= 0]
    return sorted(found, key=checkpoint_step)


def _read_back(path: Path) -> None:
    """Read ``path`` completely; raises on a truncated or corrupt file."""
    suffix = path.suffix
    if suffix == ".json":
        json.loads(path.read_text())
    elif suffix in (".yaml", ".yml"):
        yaml.safe_load(path.read_text())
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    elif suffix in (".pt", ".pth", ".bin"):
        with zipfile.ZipFile(path) as z:  # torch.save's archive format; no unpickling
            bad = z.testzip()
            if bad is not None:
                raise ValueError(f"member {bad} fails its CRC check")


def checkpoint_problem(folder: Path, extra_files: tuple[str, ...] = ()) -> str | None:
    """Why ``folder`` cannot be resumed from (``file: reason``), or None when it is intact."""
    required = [SEAL, HISTORY_FILE, *TRAINER_FILES, *extra_files]
    for name in required:
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not list(folder.glob("*.safetensors")):
        return "no model weights (*.safetensors)"
    if not list(folder.glob("rng_state*.pth")):
        return "rng_state.pth is missing"
    try:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    for path in files:
        try:
            _read_back(path)
        except Exception as exc:  # any failure to read back means: do not resume from it
            text = str(exc).strip().splitlines()
            return f"{path.name} is unreadable ({text[0] if text else type(exc).__name__})"
    return None


def pick_checkpoint(folder: Path, extra_files: tuple[str, ...] = (), log=print) -> Path | None:
    """The newest intact sealed checkpoint; damaged newer ones are reported through ``log``.

    None when there is no sealed checkpoint at all; an error when every one is damaged.
    """
    from obert.errors import ObertError

    sealed = sealed_checkpoints(folder)
    problems = []
    for ck in reversed(sealed):
        problem = checkpoint_problem(ck, extra_files)
        if problem is None:
            if problems:
                log(f"[obert] skipped damaged {'; '.join(problems)}: resuming from {ck.name}")
            return ck
        problems.append(f"{ck.name} ({problem})")
    if problems:
        raise ObertError(f"no intact checkpoint in {folder}: {'; '.join(problems)}")
    return None


def _flatten(doc: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_file(a, b) -> bool:
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """Dotted fields whose values differ between two recipe dumps (allowed changes left out)."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_CHANGES and not (
        _same_file(a.get(k), b.get(k)) if k in PATH_FIELDS else a.get(k) == b.get(k)))
