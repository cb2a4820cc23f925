"""``obert train``: run a recipe (gradual pruning + distillation) on the Hugging Face Trainer.

Layout of a run with ``output_dir: OUT``:

* ``OUT.checkpoints/checkpoint-N/``: Trainer checkpoints (weights, optimizer, scheduler, RNG,
  trainer state) plus obert's masks, pruning and evaluation history; ``obert_complete`` is
  written last, so a checkpoint without it (killed while saving) is never resumed from.
* ``OUT/``: written once, atomically, at the end: the model (safetensors), tokenizer,
  ``sparsity.json``, ``metrics.json``, ``history.json``, ``recipe.yaml`` and ``training.png``
  (sparsity and the eval metric over training). The checkpoints are then removed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import yaml
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from obert.training.callback import (MASKS_FILE, STATE_FILE, MaskLockCallback,
                                     OBertPruningCallback, lock_note, pruned_masks)
from obert.training.checkpoints import (HISTORY_FILE, RECIPE_FILE, SEAL, checkpoint_step, pick_checkpoint,
                          recipe_changes, sealed_checkpoints)
from obert.distributed import barrier, rank, world_size
from obert.errors import ObertError
from obert.card import model_card
from obert.io import MARKER, check_output, claim_output, save_model_dir, write_json
from obert.model.loading import check_finite, quiet_libraries
from obert.model.masks import MaskSet, locked_record, sparsity_record
from obert.training.recipe import Recipe, dump_recipe
from obert.training.schedule import steps_per_epoch
from obert.training.optim import MFACOptimizer
from obert.model.targets import find_targets
from obert.training.trainer import LRSchedule, ObertTrainer
from obert.tasks import TASKS
from obert.tasks.base import Task, TaskInputs


class RunRecorder(TrainerCallback):
    """Evaluates every ``eval_every_epochs``, shows sparsity and loss on the progress bar,
    and seals checkpoints (history file, then the ``obert_complete`` marker, then rotation)."""

    def __init__(self, evaluate: Callable, eval_every_epochs: float, pruning: OBertPruningCallback | None,
                 keep: int = 2, recipe_text: str = "") -> None:
        self.evaluate = evaluate
        self.recipe_text = recipe_text
        self.every = eval_every_epochs
        self.pruning = pruning
        self.keep = keep
        self.history: list[dict] = []
        self.trainer = None
        self._eval_steps: set[int] = set()

    def sparsity(self) -> float:
        return self.pruning.sparsity if self.pruning is not None else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        spe = steps_per_epoch(state.max_steps, args.num_train_epochs)
        n = int(float(args.num_train_epochs) / self.every + 1e-9)
        self._eval_steps = {round(j * self.every * spe) for j in range(1, n + 1)} - {state.max_steps}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self._eval_steps and rank() == 0:
            self.record(state, model)

    def record(self, state, model) -> dict:
        metrics = self.evaluate(model)
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                 "sparsity": self.sparsity(), **metrics}
        self.history.append(entry)
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        _print(f"[obert] epoch {entry['epoch']:.2f}: sparsity {entry['sparsity']:.4f} {shown}")
        return entry

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None or not logs or "loss" not in logs:
            return
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                cb.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", sparsity=f"{self.sparsity():.3f}")

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        write_json(folder / HISTORY_FILE, {"history": self.history})
        (folder / RECIPE_FILE).write_text(self.recipe_text)
        (folder / SEAL).write_text("ok\n")
        for old in sealed_checkpoints(Path(args.output_dir))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        if (folder / HISTORY_FILE).is_file():
            self.history = json.loads((folder / HISTORY_FILE).read_text())["history"]


def _print(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def checkpoint_dir(recipe: Recipe) -> Path:
    out = Path(recipe.output_dir)
    return out.with_name(out.name + ".checkpoints")


def build_task(recipe: Recipe, progress: bool = True) -> Task:
    """The recipe's task (``model.task_type`` in ``obert.tasks.TASKS``), built from its sections."""
    m, d, tr = recipe.model, recipe.data, recipe.training
    inputs = TaskInputs(model_path=m.path, tokenizer=m.tokenizer, reinit_head=m.reinit_head,
                        data_task=d.task, train_file=d.train_file, eval_file=d.eval_file,
                        max_train_rows=d.max_train_rows, max_eval_rows=d.max_eval_rows,
                        max_length=tr.max_length, doc_stride=tr.doc_stride, seed=tr.seed,
                        eval_batch_size=tr.eval_batch_size, progress=progress, log=_print)
    with quiet_libraries():
        return TASKS[m.task_type](inputs)


def run_recipe(recipe: Recipe, *, resume: bool = False, keep_checkpoints: bool = False,
               extra_callbacks: list | None = None, progress: bool = True, overwrite: bool = False,
               force_recipe: bool = False, inputs: list | None = None,
               extra_files: dict | None = None) -> dict:
    """Train (and gradually prune) as ``recipe`` says; returns the final metrics.

    Before any work: ``output_dir`` is checked as ``obert.io.check_output`` does (an earlier obert
    output is replaced only with ``overwrite``; ``inputs`` adds files the caller read, such as the
    recipe). ``resume`` continues from the newest intact checkpoint, and refuses when the recipe's
    settings differ from the checkpointed run's unless ``force_recipe``. ``extra_files`` adds
    files to the output (name -> JSON data or text).
    """
    d = recipe.data
    read = [recipe.model.path, recipe.model.tokenizer, d.train_file, d.eval_file,
            recipe.distillation.teacher if recipe.distillation else None, *(inputs or [])]
    check_output(recipe.output_dir, inputs=read, overwrite=overwrite, option="output_dir")
    # rank 0 holds the output for the whole run: a second run aimed at it is refused now
    with claim_output(recipe.output_dir) if rank() == 0 else nullcontext():
        return _train(recipe, read, resume=resume, keep_checkpoints=keep_checkpoints,
                      extra_callbacks=extra_callbacks, progress=progress, overwrite=overwrite,
                      force_recipe=force_recipe, extra_files=extra_files)


def _train(recipe: Recipe, read: list, *, resume: bool, keep_checkpoints: bool,
           extra_callbacks: list | None, progress: bool, overwrite: bool, force_recipe: bool,
           extra_files: dict | None = None) -> dict:
    """``run_recipe`` once its output is checked and held; ``read``: the run's local inputs."""
    from transformers import TrainingArguments

    from obert.device import pick_device

    tr = recipe.training
    ckpt = checkpoint_dir(recipe)
    _check_checkpoint_dir(ckpt, read)
    resume_from, unusable = None, []
    if resume:
        extra = (MASKS_FILE, STATE_FILE) if recipe.pruning is not None else ()
        resume_from = pick_checkpoint(ckpt, extra, log=_print if rank() == 0 else lambda s: None)
        if resume_from is not None:
            _check_same_recipe(resume_from, recipe, force_recipe)
        # Checkpoints a kill left half-written, or damaged ones newer than the one resumed
        # from, are never used: cleared once every process has chosen (below).
        sealed = set(sealed_checkpoints(ckpt))
        last = checkpoint_step(resume_from) if resume_from is not None else -1
        unusable = [p for p in (ckpt.glob("*checkpoint-*") if ckpt.is_dir() else [])
                    if p not in sealed or checkpoint_step(p) > last]
        if resume_from is None and rank() == 0:
            _print(f"[obert] no complete checkpoint in {ckpt}: starting from the beginning")
    elif sealed_checkpoints(ckpt):
        raise ObertError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue "
                         "it, or remove that directory")
    task = build_task(recipe, progress)
    model = task.model
    device = pick_device(tr.device)
    use_cpu = device.type == "cpu"
    pruning_cb = lock_cb = None
    prune = recipe.pruning
    include, exclude = (prune.include, prune.exclude) if prune is not None else (None, None)
    find_targets(model, include, exclude)  # fail before training
    locked = pruned_masks(model, include, exclude) if tr.lock_mask else None
    if locked is not None and prune is not None and prune.structure == "block4":
        loose = [n for n, m in locked.items() if m.shape[-1] % 4 or
                 bool((m.reshape(m.shape[0], -1, 4).any(-1) & ~m.reshape(m.shape[0], -1, 4).all(-1)).any())]
        if loose:  # its zeros would stay inside kept blocks: the result would not be block4
            raise ObertError(f"pruning.structure block4: {recipe.model.path} has zeros that are not "
                             f"whole blocks of 4 (in {loose[0]}): prune it unstructured, or set "
                             "training.lock_mask: false to let training refill them")
    if locked is not None and rank() == 0:
        _print(f"[obert] {lock_note(recipe.model.path, locked)} (training.lock_mask: false "
               "refills them)")
    if prune is not None:
        pruning_cb = OBertPruningCallback(recipe.schedule(), recipe.prune_config(), task.train_dataset,
                                          task.collator, include=include, exclude=exclude,
                                          log=_print, initial_masks=locked)
    elif locked is not None:
        lock_cb = MaskLockCallback(locked)
    qat_cb = None
    if recipe.quantization is not None:
        from obert.runtime.compile import int8_layers
        from obert.training.qat import QATCallback  # imports the runtime: only when asked

        if prune is None and not int8_layers(model, include, exclude):
            raise ObertError(f"quantization: {recipe.model.path} has no layer the int8 kernels "
                             "take (dense, or pruned in whole blocks of 4): add a pruning "
                             "section with structure block4, or start from such a model")

        qat_cb = QATCallback(recipe.quantization.start_epoch, inputs=recipe.quantization.inputs,
                             include=include, exclude=exclude,
                             log=_print if rank() == 0 else lambda s: None)
    recorder = RunRecorder(task.evaluate, tr.eval_every_epochs, pruning_cb or lock_cb,
                           recipe_text=dump_recipe(recipe))
    teacher = None
    dist_cfg = recipe.distillation
    if dist_cfg is not None and dist_cfg.hardness > 0:
        teacher = task.load_teacher(dist_cfg.teacher)

    save_ratio = tr.save_every_epochs / tr.epochs
    args = TrainingArguments(
        output_dir=str(ckpt), num_train_epochs=tr.epochs, learning_rate=tr.lr,
        per_device_train_batch_size=tr.batch_size, weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm, gradient_accumulation_steps=tr.gradient_accumulation_steps,
        seed=tr.seed, data_seed=tr.seed, report_to="none", logging_strategy="steps",
        logging_steps=tr.logging_steps, save_strategy="steps" if save_ratio < 1 else "no",
        save_steps=save_ratio if save_ratio < 1 else 500, save_total_limit=None,
        disable_tqdm=not progress or rank() != 0, dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu, use_cpu=use_cpu, remove_unused_columns=False,
        fp16=tr.fp16 and device.type == "cuda", eval_strategy="no",
    )
    barrier()  # every process has picked its checkpoint before any is removed
    for p in unusable if rank() == 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    callbacks = [cb for cb in (pruning_cb, lock_cb, qat_cb, recorder) if cb is not None] + \
        list(extra_callbacks or [])
    trainer = ObertTrainer(
        model=model, args=args, train_dataset=task.train_dataset, data_collator=task.collator,
        callbacks=callbacks, teacher=teacher,
        hardness=dist_cfg.hardness if dist_cfg else 0.0,
        temperature=dist_cfg.temperature if dist_cfg else 1.0,
        kd_positions=dist_cfg.positions if dist_cfg else "all",
        lr_schedule=LRSchedule(tr.lr_schedule, tr.final_lr_ratio,
                               recipe.schedule() if recipe.pruning else None),
        optimizer_cls_and_kwargs=(MFACOptimizer, {"lr": tr.lr, **tr.mfac.model_dump()})
        if tr.optimizer == "mfac" else None,
    )
    recorder.trainer = trainer
    if resume_from is not None:
        if pruning_cb is not None:
            pruning_cb.load_checkpoint(resume_from)
        recorder.load_checkpoint(resume_from)
        if rank() == 0:
            _print(f"[obert] resuming from {resume_from}")
    if rank() == 0:  # marked as obert's, so only obert's own checkpoints are ever removed
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / MARKER).touch()
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - t0
    if rank() != 0:
        return {}
    model = trainer.model
    check_finite(model, "the trained model (training diverged: lower training.lr)")
    final = recorder.record(trainer.state, model)  # with int8 inputs where QAT runs
    if qat_cb is not None:
        from obert.training.qat import remove

        remove(model)
    masks = (pruning_cb or lock_cb).masks if (pruning_cb or lock_cb) is not None \
        else MaskSet.from_zeros(find_targets(model))
    metrics = {k: v for k, v in final.items() if k not in ("step", "epoch", "sparsity")}
    metrics.update(global_sparsity=masks.stats()["global_sparsity"], train_seconds=train_seconds,
                   world_size=world_size(), metric=task.metric)
    if lock_cb is not None:  # sparse transfer: the masks are the starting model's
        sparsity = locked_record(masks, recipe.model.path)
    else:
        sparsity = sparsity_record(masks, method=prune.method if prune else "dense",
                                   structure=prune.structure if prune else None,
                                   scope=prune.scope if prune else None, source=recipe.model.path,
                                   settings=prune.model_dump() if prune else None,
                                   steps=pruning_cb.history if pruning_cb else [])
    history = {"eval": recorder.history, "pruning": sparsity["steps"],
               "log": [e for e in trainer.state.log_history if "loss" in e]}

    def extra(folder: Path) -> None:
        (folder / "recipe.yaml").write_text(dump_recipe(recipe))
        plot_history(history, task.metric, folder / "training.png")

    card = model_card(Path(recipe.output_dir).name,
                      what=recipe_steps(recipe, lock_cb is not None,
                                        len(qat_cb.layers) if qat_cb is not None else None),
                      source=recipe.model.path, recipe_text=dump_recipe(recipe),
                      sparsity=sparsity if prune is not None or lock_cb is not None else None,
                      metrics=metrics)
    save_model_dir(recipe.output_dir, model, task.tokenizer,
                   {"sparsity.json": sparsity, "metrics.json": metrics, "history.json": history,
                    "README.md": card, **({"quantization.json": qat_cb.record()} if qat_cb else {}),
                    **(extra_files or {})}, hook=extra, overwrite=overwrite)
    if not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def recipe_steps(recipe: Recipe, locked: bool, int8_layers: int | None = None) -> list[str]:
    """What a recipe run did, in words (the model card's list); ``int8_layers``: how many layers
    quantisation-aware training quantised."""
    tr, p, d = recipe.training, recipe.pruning, recipe.distillation
    steps = [f"{recipe.model.task_type} training for {tr.epochs:g} epochs (lr {tr.lr:g}, "
             f"{tr.lr_schedule} schedule, batch {tr.batch_size}, length {tr.max_length})"]
    if p is not None:
        steps.append(f"gradual {p.method} pruning ({p.structure}, {p.scope}) from "
                     f"{p.init_sparsity:g} to {p.final_sparsity:g} between epochs "
                     f"{p.start_epoch:g} and {p.end_epoch:g}, every {p.frequency:g} epoch(s)")
    if locked:
        steps.append("the starting model's zeros kept (mask locked: sparse transfer)")
    if recipe.quantization is not None and int8_layers:
        steps.append(f"quantisation-aware training of {int8_layers} layers from epoch "
                     f"{recipe.quantization.start_epoch:g} to the sparse runtime's int8 scheme "
                     "(weights per row, inputs per token); their weights saved on the int8 grid "
                     "(quantization.json)")
    elif recipe.quantization is not None:
        steps.append("quantisation-aware training asked for, but no layer was dense or pruned in "
                     "blocks of 4 for the int8 kernels: nothing was quantised")
    if d is not None and d.hardness > 0:
        steps.append(f"distillation from `{d.teacher}` (hardness {d.hardness:g}, "
                     f"temperature {d.temperature:g})")
    return steps


def _check_checkpoint_dir(ckpt: Path, inputs: list) -> None:
    """The checkpoint directory is obert's alone: it is created, filled and removed by the run."""
    if ckpt.is_symlink() or (ckpt.exists() and not ckpt.is_dir()):
        raise ObertError(f"{ckpt} (the run's checkpoint directory) exists and is not a directory")
    if ckpt.is_dir() and any(ckpt.iterdir()):
        if not (ckpt / MARKER).is_file() and not sealed_checkpoints(ckpt):
            raise ObertError(f"{ckpt} (the run's checkpoint directory) holds files obert did not "
                             "write: move them, or choose another output_dir")
    else:
        check_output(ckpt, inputs=inputs, option="checkpoint directory")


def _check_same_recipe(folder: Path, recipe: Recipe, force: bool) -> None:
    """Refuse to resume under other settings than the checkpoint's, unless ``force``."""
    from obert.training.recipe import drop_foreign_settings, load_recipe

    changed = None  # no recipe recorded, or one this version cannot read
    try:
        saved = load_recipe(doc=drop_foreign_settings(yaml.safe_load((folder / RECIPE_FILE).read_text())))
        changed = recipe_changes(saved.model_dump(), recipe.model_dump())
    except (OSError, yaml.YAMLError, ObertError):
        pass
    if changed == []:
        return
    what = "records no recipe this version can read" if changed is None else \
        f"was written under other settings ({', '.join(changed)})"
    if not force:
        raise ObertError(f"{folder.name} {what}: resume with the same recipe, or pass "
                         "--force-recipe to continue under the new one")
    if rank() == 0:
        _print(f"[obert] {folder.name} {what}: continuing under the new recipe (--force-recipe)")


def plot_history(history: dict, metric: str, path: Path) -> None:
    """Sparsity (step function over pruning steps) and the eval metric against epochs."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    evals = history["eval"]
    xs = [e["epoch"] for e in evals]
    ax.plot(xs, [e["sparsity"] for e in evals], "o-", color="tab:blue", label="sparsity")
    for p in history["pruning"]:
        ax.axvline(p["epoch"], color="tab:blue", alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("sparsity", color="tab:blue")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(xs, [e.get(metric, float("nan")) for e in evals], "s-", color="tab:red", label=metric)
    ax2.set_ylabel(metric, color="tab:red")
    ax.set_title("gradual pruning: sparsity and eval " + metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
