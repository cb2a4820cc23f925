"""Recipes: one YAML file describes a gradual-pruning run, validated before anything starts.

    model:        {path, task_type: classification | question-answering}
    data:         {task | train_file + eval_file, max_train_rows, max_eval_rows}
                  (masked-lm: eval_file may be left out, the last documents are held out)
    training:     {epochs, lr, batch_size, max_length, doc_stride, lr_schedule, final_lr_ratio,
                   weight_decay, seed, fp16, save_every_epochs, eval_every_epochs, optimizer:
                   adamw | mfac, mfac: {num_grads, damp, momentum}, ...}
    pruning:      {init_sparsity, final_sparsity, start_epoch, end_epoch, frequency, include,
                   exclude, method, structure, scope, num_recomputations, grad_batch_size, and
                   the method's own settings (obert: num_grads, fisher_block_size, damp, update,
                   max_memory_gb)}                                  (omit for dense training)
    distillation: {teacher, hardness, temperature, positions}       (omit for no distillation)
    output_dir:   where the final model, sparsity.json and metrics.json go

Unknown fields are errors (a typo must not silently fall back to a default). ``--set
section.key=value`` overrides any field; values are parsed as YAML (``0.9``, ``true``, ``[a, b]``).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from obert.errors import ObertError
from obert.model.targets import compile_patterns
from obert.pruning.settings import PruneSettings, Settings, nm_of
from obert.tasks import TASKS
from obert.training.optim import MFACSettings


class _Section(Settings):
    """A recipe section: unknown fields, NaN, infinity and true/false for numbers are errors."""

    @model_validator(mode="after")
    def _expand_home(self):
        """``~/x`` in a path field means the home directory (YAML never expands it)."""
        for name in ("path", "tokenizer", "train_file", "eval_file", "teacher", "output_dir"):
            value = getattr(self, name, None)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        return self


TaskType = Literal.__getitem__(tuple(TASKS))  # the registered tasks (obert.tasks.TASKS)


class ModelSection(_Section):
    path: str
    task_type: TaskType = "classification"
    tokenizer: str | None = None  # another tokenizer (hub id or directory) when path has none
    reinit_head: bool = False  # train a new classification head when the labels differ


class DataSection(_Section):
    task: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    max_train_rows: int | None = Field(None, gt=0)
    max_eval_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _source(self):
        if self.task is None and self.train_file is None:  # eval_file: checked by the task type
            raise ValueError("give data.task, or data.train_file and data.eval_file")
        if self.task is not None and (self.train_file is not None or self.eval_file is not None):
            raise ValueError("give data.task or data.train_file and data.eval_file, not both")
        return self


class TrainingSection(_Section):
    epochs: float = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    max_length: int = Field(128, ge=8)
    doc_stride: int = Field(128, gt=0)  # question answering only
    lr_schedule: Literal["rewind", "linear", "constant"] = "rewind"
    final_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seed range
    fp16: bool = False  # used on CUDA only
    save_every_epochs: float = Field(1.0, gt=0)
    eval_every_epochs: float = Field(1.0, gt=0)
    logging_steps: int = Field(50, gt=0)
    device: str | None = None
    # A sparse starting model (at least 1% of its prunable weights exactly zero) keeps its zeros
    # through training: sparse transfer, or gradual pruning continuing from them.
    lock_mask: bool = True
    # adamw: the Trainer's AdamW; mfac: obert.training.optim.MFACOptimizer (settings in ``mfac``)
    optimizer: Literal["adamw", "mfac"] = "adamw"
    mfac: MFACSettings | None = None

    @model_validator(mode="after")
    def _optimizer_settings(self):
        if self.mfac is not None and self.optimizer != "mfac":
            raise ValueError("training.mfac holds the settings of training.optimizer: mfac")
        if self.optimizer == "mfac" and self.mfac is None:
            self.mfac = MFACSettings()
        return self


class PruningSection(_Section, PruneSettings):
    """The schedule of gradual pruning and what to prune; the pruning settings are
    ``PruneSettings``' and the method's own (its ``Settings``: the ``obert prune`` options),
    defined there once."""

    model_config = ConfigDict(extra="allow")  # the method's settings, checked by its model

    init_sparsity: float = Field(ge=0, lt=1)
    final_sparsity: float = Field(ge=0, lt=1)
    start_epoch: float = Field(ge=0)
    end_epoch: float = Field(ge=0)
    frequency: float = Field(1.0, gt=0)
    include: list[str] | None = None
    exclude: list[str] | None = None

    @model_validator(mode="after")
    def _nm_final(self):
        nm = nm_of(self.structure)
        if nm is not None and abs(self.final_sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"pruning.final_sparsity: {self.structure} keeps {nm[0]} of every "
                             f"{nm[1]} weights, so it must be {1 - nm[0] / nm[1]:g}")
        return self

    @model_validator(mode="after")
    def _learned_scores_need_training(self):
        from obert.pruning.methods import METHODS

        if METHODS[self.method].gradual_only and self.start_epoch <= 0:
            raise ValueError(f"{self.method} learns its scores while training: start pruning "
                             "after some (pruning.start_epoch > 0)")
        return self

    @model_validator(mode="after")
    def _patterns(self):
        for name in ("include", "exclude"):
            try:
                compile_patterns(getattr(self, name), f"pruning.{name}")
            except ObertError as exc:
                raise ValueError(str(exc)) from None
        return self


class QuantizationSection(_Section):
    """Quantisation-aware training to the runtime's int8 scheme (``obert.training.qat``)."""

    start_epoch: float = Field(ge=0)
    inputs: bool = True  # fake-quantise the int8 layers' inputs per token, as the kernels do


class DistillationSection(_Section):
    teacher: str
    hardness: float = Field(1.0, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    positions: Literal["all", "masked"] = Field(
        "all", description="masked-lm: distill the token distributions at every real token (all) "
        "or at the masked tokens only (masked, as DistilBERT; the vocabulary heads of student and "
        "teacher then run there alone, a fraction of their cost)")


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    training: TrainingSection
    pruning: PruningSection | None = None
    quantization: QuantizationSection | None = None
    distillation: DistillationSection | None = None
    output_dir: str

    @model_validator(mode="after")
    def _consistent(self):
        tr = self.training
        q = self.quantization
        if q is not None:
            if q.start_epoch >= tr.epochs:
                raise ValueError(f"quantization.start_epoch ({q.start_epoch:g}) must come before the "
                                 f"end of training (training.epochs = {tr.epochs:g})")
            if self.pruning is not None and self.pruning.structure != "block4":
                raise ValueError("quantization trains the int8 kernels' layers, which are block4: "
                                 "set pruning.structure: block4")
            if self.pruning is not None and q.start_epoch < self.pruning.end_epoch:
                raise ValueError(f"quantization.start_epoch ({q.start_epoch:g}) must not come "
                                 f"before pruning.end_epoch ({self.pruning.end_epoch:g})")
        if self.data.train_file is not None and self.data.eval_file is None and \
                self.model.task_type != "masked-lm":
            raise ValueError("give data.task, or data.eval_file with data.train_file (only "
                             "masked-lm holds out training documents for evaluation)")
        if self.distillation is not None and self.distillation.positions == "masked" and \
                self.model.task_type != "masked-lm":
            raise ValueError("distillation.positions: masked is for masked-lm (the other tasks "
                             "have one distribution per example)")
        if self.model.task_type == "question-answering" and tr.doc_stride >= tr.max_length:
            raise ValueError(f"training.doc_stride ({tr.doc_stride}) must be shorter than "
                             f"training.max_length ({tr.max_length})")
        p = self.pruning
        if p is not None:
            if p.end_epoch > self.training.epochs:
                raise ValueError(f"pruning.end_epoch ({p.end_epoch}) is after the last epoch "
                                 f"(training.epochs = {self.training.epochs})")
            # The schedule checks its own arithmetic (frequency dividing the pruning span, ...).
            try:
                self.schedule()
                self.prune_config()
            except ObertError as exc:
                raise ValueError(str(exc)) from None
        return self

    def schedule(self):
        from obert.training.schedule import PruningSchedule

        p = self.pruning
        return PruningSchedule(p.init_sparsity, p.final_sparsity, p.start_epoch, p.end_epoch,
                               p.frequency)

    def prune_config(self):
        """The per-step pruning settings (the sparsity is set by the schedule at each step)."""
        from obert.pruning.settings import PruneConfig

        p = self.pruning
        return PruneConfig(sparsity=p.final_sparsity, seed=self.training.seed, **p.prune_settings())


def _set(doc: dict, assignment: str) -> str:
    """Apply ``section.key=value`` to ``doc``; returns the dotted key."""
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not _ or not all(parts):
        raise ObertError(f"--set expects section.key=value, got '{assignment}'")
    node = doc
    for p in parts[:-1]:
        if isinstance(node, list):  # stages: picked by name
            named = [n for n in node if isinstance(n, dict) and n.get("name") == p]
            if not named:
                raise ObertError(f"--set {key}: no stage named '{p}'")
            node = named[0]
            continue
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], (dict, list)):
            raise ObertError(f"--set {key}: '{p}' is not a section")
        node = node[p]
    if isinstance(node, list):
        raise ObertError(f"--set {key}: name a field of a stage (stages.NAME.section.key=value)")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw
    return ".".join(parts)


def _format_error(exc: ValidationError, where: str, overridden: set[str],
                  rename: Callable[[tuple], tuple] = lambda loc: loc) -> str:
    """Every problem (up to three) in one line, each with its field (``rename`` may rewrite its
    location) and the value given; a field set by ``--set`` is blamed on ``--set``, not on the
    file."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in rename(tuple(err["loc"])))  # empty: the whole recipe
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        got = err.get("input")
        shown = f" (got {got!r})" if (got is None or isinstance(got, (int, float, str))) \
            and err["type"] != "extra_forbidden" else ""
        source = "--set " if any(loc == k or loc.startswith(k + ".") for k in overridden) else ""
        parts.append(f"{source}{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    more = f" (and {len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return f"{where}: {'; '.join(parts)}{more}"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # resolves merge keys (<<: *base) as the base loader does
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe_doc(path: str | Path) -> dict:
    """The YAML mapping of a recipe file (keys given twice are errors)."""
    where = str(path)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ObertError(f"recipe {'is a directory' if path.is_dir() else 'not found'}: {path}")
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ObertError(f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start})") from None
    except OSError as exc:
        raise ObertError(f"cannot read recipe {where}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ObertError(f"{where}: not valid YAML{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise ObertError(f"{where}: a recipe is a mapping of sections (model, data, training, ...)")
    return doc


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                doc: dict | None = None) -> Recipe:
    """Parse and validate a recipe file (or ``doc``), applying ``--set`` overrides first."""
    where = str(path) if path else "recipe"
    if doc is None:
        doc = read_recipe_doc(path)
    if not isinstance(doc, dict):
        raise ObertError(f"{where}: a recipe is a mapping of sections (model, data, training, ...)")
    if "stages" in doc:
        raise ObertError(f"{where}: a staged recipe (stages: ...): load it with load_staged")
    overridden = {_set(doc, assignment) for assignment in overrides or []}
    try:
        return Recipe.model_validate(doc)
    except ValidationError as exc:
        raise ObertError(_format_error(exc, where, overridden)) from None


def drop_foreign_settings(doc: dict) -> dict:
    """``doc`` without the pruning settings of methods other than its own (recipes saved by
    versions that recorded every method's settings in every recipe)."""
    from obert.pruning.methods import METHODS

    pruning = doc.get("pruning") if isinstance(doc, dict) else None
    if not isinstance(pruning, dict) or pruning.get("method", "obert") not in METHODS:
        return doc
    own = METHODS[pruning.get("method", "obert")].Settings.model_fields
    others = {n for cls in METHODS.values() for n in cls.Settings.model_fields} - set(own)
    return {**doc, "pruning": {k: v for k, v in pruning.items() if k not in others}}


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)
