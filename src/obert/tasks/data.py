"""Text-classification data: local JSONL/CSV files or GLUE tasks, tokenised for a model.

Rows carry ``text`` (and optionally ``text_pair``) and ``label`` (string or integer). Label ids
follow the sorted order of the label values and are stored in the model config
(``label2id``/``id2label``) so a pruned or fine-tuned model maps them the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from obert.errors import ObertError, first_line

# GLUE tasks: (text field, pair field or None, evaluation split)
GLUE_TASKS: dict[str, tuple[str, str | None, str]] = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "stsb": ("sentence1", "sentence2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}


def sample_indices(n_rows: int, n: int | None, seed: int = 0) -> list[int] | None:
    """``n`` row indices drawn without replacement with ``seed``; None when all rows are kept."""
    if n is None or n >= n_rows:
        return None
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:n].tolist()


@dataclass
class TextData:
    """Raw rows of one split: ``texts``, optional ``pairs`` and raw ``labels``."""

    texts: list[str]
    pairs: list[str] | None
    labels: list

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int = 0) -> "TextData":
        """``n`` rows drawn without replacement with ``seed`` (all rows when n is None)."""
        return take_rows(self, n, seed)


def take_rows(rows, n: int | None, seed: int = 0):
    """``rows`` (a dataclass of per-row lists; None for a column it lacks) cut to ``n`` rows drawn
    without replacement with ``seed``; ``rows`` itself when n is None or not smaller."""
    idx = sample_indices(len(rows), n, seed)
    if idx is None:
        return rows
    columns = (getattr(rows, f.name) for f in dataclasses.fields(rows))
    return type(rows)(*(None if col is None else [col[i] for i in idx] for col in columns))


def read_text(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; a one-line error naming the file and line otherwise."""
    lines = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
                except UnicodeDecodeError as exc:
                    raise ObertError(f"{path}: line {number} is not UTF-8 text (byte "
                                     f"{raw[exc.start]:#04x})") from None
    except OSError as exc:
        raise ObertError(f"cannot read {path}: {exc.strerror}") from None
    return lines


def _no_repeats(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"repeats the key '{k}'")
    return dict(pairs)


def count_rows(path: Path, builder: str) -> int:
    """Rows of a JSON-lines / JSON-array or CSV file, each checked so that a malformed one is
    named by its line (the parsers behind ``datasets`` report positions in a buffer instead, and
    pandas silently turns a CSV's extra first field into an index)."""
    lines = read_text(path)
    first = next((line for line in lines if line.strip()), "")
    # CSV and a JSON array are parsed whole; JSON lines one by one, so a bad one is named
    text = "".join(lines) if builder == "csv" or first.lstrip().startswith("[") else None
    if builder == "csv":
        import csv
        import io
        import sys

        limit = csv.field_size_limit(sys.maxsize)  # long texts are fine; the default is 128 KiB
        try:
            rows = list(csv.reader(io.StringIO(text)))
        except csv.Error as exc:
            raise ObertError(f"{path}: not valid CSV ({exc})") from None
        finally:
            csv.field_size_limit(limit)
        width = len(rows[0]) if rows else 0
        for number, row in enumerate(rows[1:], 2):
            if row and len(row) != width:
                raise ObertError(f"{path}: row {number - 1} has {len(row)} fields but the header "
                                 f"has {width} (quote text that holds commas)")
        return sum(1 for row in rows[1:] if row)
    if text is not None:  # one JSON array of objects
        try:
            items = json.loads(text, object_pairs_hook=_no_repeats)
        except ValueError as exc:
            raise ObertError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise ObertError(f"{path}: a JSON file holds one object per row")
        return len(items)
    n = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_no_repeats)
        except ValueError as exc:
            raise ObertError(f"{path}: line {number} is not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ObertError(f"{path}: line {number} is not a JSON object (one object per line)")
        n += 1
    return n


def load_file(path: str | Path) -> TextData:
    """Load a ``.jsonl``/``.json`` or ``.csv`` file through ``datasets``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ObertError(f"data file {'is a directory' if path.is_dir() else 'not found'}: {path}")
    suffix = path.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise ObertError(f"unsupported data file type '{suffix}' (use .jsonl, .json or .csv): {path}")
    if count_rows(path, builder) == 0:
        raise ObertError(f"{path}: no rows")
    import datasets

    from obert.model.loading import quiet_libraries

    try:
        with quiet_libraries(datasets=True):  # failures are reported here, as one line
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise ObertError(f"cannot read {path}: {first_line(exc)}") from exc
    return _from_columns(ds, "text", "text_pair" if "text_pair" in ds.column_names else None, str(path))


def load_glue(task: str, split: str) -> TextData:
    """A GLUE task's ``train`` or evaluation split (``split="eval"``) from the hub."""
    if task not in GLUE_TASKS:
        raise ObertError(f"unknown task '{task}' (known: {', '.join(sorted(GLUE_TASKS))})")
    text, pair, eval_split = GLUE_TASKS[task]
    import datasets

    try:
        ds = datasets.load_dataset("glue", task, split=eval_split if split == "eval" else split)
    except Exception as exc:
        raise ObertError(f"cannot load GLUE task '{task}' (is the hub reachable?): "
                         f"{first_line(exc)}") from exc
    return _from_columns(ds, text, pair, f"glue/{task}")


def _from_columns(ds, text: str, pair: str | None, where: str) -> TextData:
    for col in (text, "label") + ((pair,) if pair else ()):
        if col not in ds.column_names:
            raise ObertError(f"{where}: missing column '{col}' (have: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise ObertError(f"{where}: no rows")
    labels = list(ds["label"])
    for i, lbl in enumerate(labels, 1):
        if lbl is None:
            raise ObertError(f"{where}: row {i} has no label")
        if isinstance(lbl, float) and lbl.is_integer():
            labels[i - 1] = int(lbl)  # CSV readers turn integer columns with gaps into floats
        elif isinstance(lbl, bool) or not isinstance(lbl, (str, int)):
            raise ObertError(f"{where}: row {i} has label {lbl!r}; class labels are strings or "
                             "integers")
    for column in (text, pair) if pair else (text,):
        for i, t in enumerate(ds[column], 1):
            if not isinstance(t, str):
                raise ObertError(f"{where}: row {i}: column '{column}' must hold text, got {t!r}")
    return TextData(list(ds[text]), list(ds[pair]) if pair else None, labels)


def load_data(source: str | None, task: str | None, split: str) -> TextData:
    """Rows from a local file (``source``) or a GLUE ``task`` (``split`` is ``train``/``eval``)."""
    if source:
        return load_file(source)
    if task:
        return load_glue(task, split)
    raise ObertError("give a data file or --task")


def label_list(labels: list) -> list:
    """Distinct label values in sorted order (ids are positions in this list)."""
    values = set(labels)
    try:
        return sorted(values)
    except TypeError:
        examples = {type(v).__name__: v for v in values}
        mixed = " and ".join(f"{kind} ({v!r})" for kind, v in sorted(examples.items()))
        raise ObertError(f"labels mix {mixed}: give every data file the same kind of label") from None


def training_labels(train: "TextData", eval_rows: "TextData | None" = None) -> list:
    """Label values for a classifier's head: every label seen in either split (a subset still
    knows all classes), sorted; the training split itself must hold at least two classes."""
    if len(label_list(train.labels)) < 2:
        raise ObertError(f"the training data has only one class ({train.labels[0]!r}): a "
                         "classifier needs at least two")
    return label_list(train.labels + (eval_rows.labels if eval_rows is not None else []))


def generic_label_names(names) -> bool:
    """Whether a model names its classes ``LABEL_0..LABEL_n-1``, i.e. not at all."""
    return all(re.fullmatch(r"LABEL_\d+", str(k)) for k in names)


def label_map_from_config(config) -> dict:
    """``raw label -> id`` from a model config (keys may be stored as strings)."""
    return {k: int(v) for k, v in (config.label2id or {}).items()}


def encode_labels(labels: list, label2id: dict) -> list[int]:
    """Map raw labels to ids; integer labels may also match their string form."""
    out = []
    for lbl in labels:
        if lbl in label2id:
            out.append(label2id[lbl])
        elif str(lbl) in label2id:
            out.append(label2id[str(lbl)])
        else:
            raise ObertError(f"label '{lbl}' is not one of the model's labels "
                             f"({', '.join(map(str, label2id))})")
    return out


class Encoded(torch.utils.data.Dataset):
    """Tokenised rows (unpadded) with integer labels; batches pad to their longest row."""

    def __init__(self, data: TextData, tokenizer, label2id: dict, max_length: int) -> None:
        if max_length < 8:
            raise ObertError("max length must be at least 8 tokens")
        enc = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length)
        self.features = [dict(zip(enc.keys(), vals)) for vals in zip(*enc.values())]
        for f, y in zip(self.features, encode_labels(data.labels, label2id)):
            f["labels"] = y
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]

    def collate(self, rows: list[dict]) -> dict:
        return self.tokenizer.pad(rows, return_tensors="pt")

    def loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               by_length: bool = False) -> DataLoader:
        """Batches; ``by_length`` orders rows by length (fast evaluation, same results)."""
        if by_length:
            order = sorted(range(len(self)), key=lambda i: len(self.features[i]["input_ids"]))
            return DataLoader(torch.utils.data.Subset(self, order), batch_size=batch_size,
                              collate_fn=self.collate)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=gen,
                          collate_fn=self.collate)
