"""Staged recipes: an ordered list of stages, each starting from the previous stage's output.

    output_dir: runs/compound            # stage outputs: runs/compound/NN-NAME unless given
    stages:
      - name: upstream                   # a training stage: the sections of a recipe
        model: {path: bert-base-uncased, task_type: masked-lm}
        data: ...
        training: ...
        pruning: ...
        distillation: ...
      - name: drop
        drop_layers: {num_layers: 3}     # or keep: [0, 5, 11]
      - name: transfer                   # model.path: the previous stage's output
        model: {task_type: classification, reinit_head: true}
        data: ...
        training: ...
      - name: compile
        compile: {dtype: float32}        # the last stage: a compiled model is not trained on

Every stage is checked before the first one starts. Each writes its own output directory with a
``stage.json`` (the stage as run and its input) and a model card; ``obert train --resume`` skips
stages whose output is finished under the same settings and resumes a training stage from its
checkpoints. ``--set stages.NAME.section.key=value`` overrides a field of one stage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from obert.errors import ObertError
from obert.training.recipe import (DataSection, DistillationSection, PruningSection,
                                   QuantizationSection, Recipe, TrainingSection, _format_error,
                                   _Section, _set, read_recipe_doc)

STAGE_FILE = "stage.json"
TRAINING_SECTIONS = ("data", "training", "pruning", "quantization", "distillation")


class StageModel(_Section):
    """A stage's model section: ``path`` defaults to the previous stage's output."""

    path: str | None = None
    task_type: str = "classification"
    tokenizer: str | None = None
    reinit_head: bool = False


class DropLayersSection(_Section):
    keep: list[int] | None = None
    num_layers: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self):
        if (self.keep is None) == (self.num_layers is None):
            raise ValueError("give keep or num_layers (one of them)")
        return self


class CompileSection(_Section):
    dtype: Literal["float32", "int8"] = "float32"
    # default: speed, or sparsity after quantisation-aware training (every trained int8 layer
    # then runs int8, so the compiled model computes what was evaluated)
    choose: Literal["speed", "sparsity"] | None = None
    min_sparsity: float | None = Field(None, ge=0, le=1)


class Stage(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str | None = None
    model: StageModel | None = None
    data: DataSection | None = None
    training: TrainingSection | None = None
    pruning: PruningSection | None = None
    quantization: QuantizationSection | None = None
    distillation: DistillationSection | None = None
    drop_layers: DropLayersSection | None = None
    compile: CompileSection | None = None

    @property
    def kind(self) -> str:
        return "drop_layers" if self.drop_layers else "compile" if self.compile else "training"

    @model_validator(mode="after")
    def _one_kind(self):
        trains = [k for k in TRAINING_SECTIONS if getattr(self, k)]
        kinds = [k for k in ("drop_layers", "compile") if getattr(self, k)] + (["training"] if trains else [])
        if len(kinds) != 1:
            raise ValueError("a stage trains (data and training sections), drops layers "
                             "(drop_layers) or compiles (compile): exactly one of them")
        if kinds == ["training"] and (self.data is None or self.training is None):
            raise ValueError("a training stage needs data and training sections")
        if kinds != ["training"] and self.model is not None and \
                set(self.model.model_fields_set) - {"path"}:
            raise ValueError("a drop_layers or compile stage takes only model.path")
        return self


class StagedRecipe(_Section):
    output_dir: str
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ, got {', '.join(names)}")
        if self.stages[0].model is None or self.stages[0].model.path is None:
            raise ValueError("the first stage needs model.path (the starting model)")
        for s in self.stages[:-1]:
            if s.kind == "compile":
                raise ValueError(f"stage '{s.name}' compiles: only the last stage can")
        return self

    def stage_dirs(self) -> list[str]:
        return [s.output_dir or str(Path(self.output_dir) / f"{i + 1:02d}-{s.name}")
                for i, s in enumerate(self.stages)]

    def sources(self) -> list[str]:
        """The model each stage starts from: its model.path, else the previous stage's output."""
        out, previous = [], None
        for stage, folder in zip(self.stages, self.stage_dirs()):
            source = stage.model.path if stage.model is not None and stage.model.path else previous
            out.append(source)
            previous = folder
        return out

    def stage_recipe(self, i: int) -> Recipe:
        """Stage ``i`` (a training stage) as a recipe of its own."""
        stage = self.stages[i]
        doc = {"model": {**(stage.model.model_dump(exclude_none=True) if stage.model else {}),
                         "path": self.sources()[i]},
               **{k: getattr(stage, k).model_dump(exclude_none=True)
                  for k in TRAINING_SECTIONS if getattr(stage, k)},
               "output_dir": self.stage_dirs()[i]}
        return Recipe.model_validate(doc)


def load_staged(path: str | Path, overrides: list[str] | None = None,
                doc: dict | None = None) -> StagedRecipe:
    """Parse and check a staged recipe, every stage's recipe included, before anything runs."""
    where = str(path) if path else "recipe"
    doc = read_recipe_doc(path) if doc is None else doc
    overridden = {_set(doc, assignment) for assignment in overrides or []}
    stages = doc.get("stages") if isinstance(doc.get("stages"), list) else []

    def by_name(loc: tuple) -> tuple:  # stages.2.x -> stages.NAME.x, as --set names them
        if len(loc) > 1 and loc[0] == "stages" and isinstance(loc[1], int) and loc[1] < len(stages) \
                and isinstance(stages[loc[1]], dict) and isinstance(stages[loc[1]].get("name"), str):
            return ("stages", stages[loc[1]]["name"], *loc[2:])
        return loc

    try:
        staged = StagedRecipe.model_validate(doc)
    except ValidationError as exc:
        raise ObertError(_format_error(exc, where, overridden, by_name)) from None
    for i, stage in enumerate(staged.stages):
        if stage.kind != "training":
            continue
        try:
            staged.stage_recipe(i)
        except ValidationError as exc:
            prefix = f"stages.{stage.name}."
            raise ObertError(_format_error(exc, f"{where}: stage '{stage.name}'",
                                           {k.removeprefix(prefix) for k in overridden})) from None
    check_layer_counts(staged, where)
    return staged


def check_layer_counts(staged: StagedRecipe, where: str) -> None:
    """Drop stages name layers the model will have, from the starting model's config on: a
    training stage keeps the count, a drop stage sets it (a model whose config cannot be read
    here, e.g. on an unreachable hub, is checked when its stage runs)."""
    from obert.model.loading import load_config
    from obert.model.surgery import check_keep, evenly_spaced

    layers = None
    for stage in staged.stages:
        if stage.model is not None and stage.model.path:
            try:
                layers = getattr(load_config(stage.model.path), "num_hidden_layers", None)
            except ObertError:
                layers = None
        d = stage.drop_layers
        if d is None or layers is None:
            continue
        try:
            kept = check_keep(d.keep, layers) if d.keep is not None else evenly_spaced(layers, d.num_layers)
        except ObertError as exc:
            field = "keep" if d.keep is not None else "num_layers"
            msg = re.sub(r"^--(keep|num-layers) ?", "", str(exc))  # the CLI's wording, here a field
            msg = f"layer {msg}" if msg[:1].isdigit() or msg[:1] == "-" else msg
            raise ObertError(f"{where}: stages.{stage.name}.drop_layers.{field}: {msg}") from None
        layers = len(kept)


def stage_record(staged: StagedRecipe, i: int) -> dict:
    """What ``stage.json`` holds: the stage as run and the model it started from."""
    stage = staged.stages[i]
    return {"stage": stage.name, "index": i, "kind": stage.kind, "source": staged.sources()[i],
            "settings": json.loads(stage.model_dump_json(exclude_none=True))}


def finished(folder: str | Path, record: dict) -> bool | None:
    """True when ``folder`` holds this stage's finished output, False when it holds one made
    under other settings (or another stage's), None when it holds no stage output."""
    try:
        found = json.loads((Path(folder) / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found == record


def run_stages(staged: StagedRecipe, *, resume: bool = False, overwrite: bool = False,
               keep_checkpoints: bool = False, progress: bool = True, force_recipe: bool = False,
               inputs: list | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the stages in order; returns each stage's metrics (``{}`` where there are none).

    With ``resume``, a stage whose output is finished under the same settings is skipped, and a
    training stage continues from its checkpoints. A finished output is replaced only with
    ``overwrite``.
    """
    from obert.distributed import barrier, rank
    from obert.training.gradual import run_recipe
    from obert.training.layers import drop_layers_dir

    results = []
    rerun = False  # a stage ran again: every later stage's input changed
    for i, (stage, out) in enumerate(zip(staged.stages, staged.stage_dirs())):
        record = stage_record(staged, i)
        state = finished(out, record)
        head = f"[obert] stage {i + 1}/{len(staged.stages)} '{stage.name}'"
        if state and resume and not rerun:
            log(f"{head}: finished in {out}, skipped")
            results.append({})
            continue
        replace = overwrite or (rerun and state is not None)  # our own output of a stale input
        if state is not None and not replace:
            why = "holds its finished output" if state else "holds an output made under other settings"
            hint = "pass --overwrite to run it again" if resume else \
                "pass --resume to skip finished stages, or --overwrite to run it again"
            raise ObertError(f"stage '{stage.name}': {out} {why}: {hint}")
        log(f"{head}: {stage.kind.replace('_', ' ')} -> {out}")
        files = {STAGE_FILE: record}
        if stage.kind == "training":
            results.append(run_recipe(staged.stage_recipe(i), resume=resume, overwrite=replace,
                                      keep_checkpoints=keep_checkpoints, progress=progress,
                                      force_recipe=force_recipe, inputs=inputs, extra_files=files))
        elif rank() != 0:  # one process writes the output of a stage that does not train
            results.append({})
        elif stage.kind == "drop_layers":
            d = stage.drop_layers
            drop_layers_dir(record["source"], out, keep=d.keep, num_layers=d.num_layers,
                            overwrite=replace, extra_files=files, log=log)
            results.append({})
        else:
            results.append(compile_stage(record["source"], out, stage.compile, files, replace))
        barrier()  # the next stage reads this one's output, on every process
        rerun = True
    return results


def compile_stage(source: str, out: str, c: CompileSection, files: dict, overwrite: bool) -> dict:
    """Compile ``source`` for the sparse CPU runtime into ``out`` (no calibration: int8 weights
    rounded to nearest)."""
    from obert.io import check_output, claim_output
    from obert.model.loading import load_tokenizer
    from obert.runtime import compile as compile_runtime, save_compiled
    from obert.runtime.bench import load_model
    from obert.runtime.compile import compiled_card, trained_layers

    out = check_output(out, inputs=[source], overwrite=overwrite)
    with claim_output(out):
        net = load_model(source)
        try:
            tok = load_tokenizer(source, None, net.config)
        except ObertError:
            tok = None
        trained = trained_layers(source)
        choose = c.choose or ("sparsity" if trained is not None else "speed")
        report = compile_runtime(net, dtype=c.dtype, min_sparsity=c.min_sparsity, choose=choose,
                                 trained_int8=trained)
        report.check(source, c.dtype, dtype_name="compile.dtype", structure_name="pruning.structure:")
        save_compiled(net, out, tok, overwrite=overwrite,
                      extra={"README.md": compiled_card(out.name, source, report, c.dtype),
                             STAGE_FILE: json.dumps(files[STAGE_FILE], indent=2)})
    return {"sparse_layers": len(report.sparse_layers)}
