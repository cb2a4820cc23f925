"""The ``obert`` command line: ``finetune``, ``prune``, ``train``, ``drop-layers``, ``compile``,
``export`` and ``bench``.

Exit codes: 0 on success; 2 for a usage or input error (one line naming the option or file);
130 when interrupted (Ctrl-C), 143 on SIGTERM (129 on SIGHUP); 1 for anything unexpected.
Errors are one line on stderr (``OBERT_DEBUG=1`` shows the traceback). Every option is checked,
and every output path with it, before any work starts; outputs appear only complete (see
``obert.io``).
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from obert.errors import ObertError, first_line
from obert.pruning.settings import PruneConfig, field_types, option_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Second-order (oBERT) pruning of Hugging Face encoder models.")

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt")


def number(kind: type = float, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> Callable[[object], float | int]:
    """An option parser: a finite ``kind`` (float or int) within the given bounds.

    Failures are usage errors naming the option (``Invalid value for '--damp': ...``), exit 2.
    """
    bounds = [f"{op} {v:g}" for op, v in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if v is not None]
    what = ("a finite number" if kind is float else "an integer") + \
        (f" {' and '.join(bounds)}" if bounds else "")

    def parse(value: object) -> float | int:
        try:
            x = kind(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"expected {what}, got '{value}'") from None
        ok = (kind is int or math.isfinite(x)) and (gt is None or x > gt) and \
            (ge is None or x >= ge) and (lt is None or x < lt) and (le is None or x <= le)
        if not ok:
            raise typer.BadParameter(f"must be {what}, got {value}")
        return x

    return parse


POSITIVE, COUNT = number(float, gt=0), number(int, ge=1)


def _option(name: str, field, default, help: str) -> inspect.Parameter:
    """A typer option for a settings field: named by ``option_name``, a finite-number parser for
    numbers, ``--x/--no-x`` for a switch, text for anything else (the model checks values)."""
    kind = field_types(field.annotation)[0]
    kind = kind if kind in (int, float, bool, str) else str  # Literal, Enum, Path: the model parses
    parser = {int: number(int), float: number()}.get(kind)
    flag = option_name(name)
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    option = typer.Option(default, *decls, help=help, **({"parser": parser} if parser else {}))
    optional = default is None or type(None) in typing.get_args(field.annotation)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[kind] if optional else kind)


def settings_options(model, methods: dict | None = None, taken: set[str] = frozenset()) -> list[inspect.Parameter]:
    """The fields of a pydantic settings model as typer options: one per field, its default and
    its description as help; then the own settings of every method in ``methods`` (a field two
    methods share is one option), default None (= the chosen method's default) and help naming
    the methods that take it. A method setting named like a field or one of ``taken`` (the
    command's own parameters) is an error naming the method."""
    params = [_option(name, field, ... if field.is_required() else field.default, field.description)
              for name, field in model.model_fields.items()]
    owners: dict[str, list[str]] = {}
    for method, cls in (methods or {}).items():
        for name in cls.Settings.model_fields:
            if name in model.model_fields or name in taken:
                raise ObertError(f"method '{method}' has a setting '{name}', a name obert prune "
                                 "already uses: rename it")
            owners.setdefault(name, []).append(method)
    for name, who in owners.items():
        fields = [methods[m].Settings.model_fields[name] for m in who]
        shown = [_shown(f.default) for f in fields]
        default = "" if fields[0].default is None else f"; default {shown[0]}" \
            if len(set(shown)) == 1 else "; default " + ", ".join(f"{d} ({m})" for d, m in zip(shown, who))
        params.append(_option(name, fields[0], None, f"{'/'.join(who)}: {fields[0].description}{default}"))
    return params


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def with_settings(model):
    """A command taking ``**settings`` gets the model's fields, and the own settings of every
    registered pruning method, as options (see ``settings_options``): the options, their help
    and defaults are the models', defined once. ``main`` attaches them again at each call, so a
    method registered after import has its options too."""
    def wrap(fn):
        fn.settings_model = model
        attach_settings(fn)
        return fn
    return wrap


def attach_settings(fn) -> None:
    """Give a ``with_settings`` command its options (from the methods registered now)."""
    from obert.pruning.methods import METHODS

    signature = inspect.signature(fn)
    previous = getattr(fn, "settings_names", set())
    own = [p for p in signature.parameters.values()
           if p.kind != p.VAR_KEYWORD and p.name not in previous]
    extra = settings_options(fn.settings_model, METHODS, {p.name for p in own})
    fn.__signature__ = signature.replace(parameters=own + extra)
    fn.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k not in previous},
                          **{p.name: p.annotation for p in extra}}
    fn.settings_names = {p.name for p in extra}


def given_settings(model, settings: dict) -> dict:
    """The options of ``with_settings`` the user gave: a method's own option left at None
    takes the method's default (and is not one it could refuse)."""
    return {k: v for k, v in settings.items() if k in model.model_fields or v is not None}


SEED = number(int, ge=0, lt=2**32)
LENGTH = number(int, ge=8)


def _data(file: Optional[str], task: Optional[str], split: str, required: bool = True,
          option: str | None = None):
    """Rows from ``file`` or a GLUE ``task``; ``option`` names the file's option in errors."""
    from obert.tasks.data import load_data

    option = option or f"--{'train' if split == 'train' else 'eval'}-file"
    if file is not None and task is not None and split == "train":
        raise ObertError(f"give {option} or --task, not both")
    if file is None and task is None:
        if required:
            raise ObertError(f"give {option} or --task")
        return None
    return load_data(file, task, split)


def _encode(rows, tokenizer, model, max_length: int):
    from obert.tasks.data import Encoded, label_map_from_config

    return None if rows is None else Encoded(rows, tokenizer, label_map_from_config(model.config),
                                             max_length)


OVERWRITE = typer.Option(False, "--overwrite", help="Replace an earlier obert output at --out")
OUT_MODEL = typer.Option(..., "--out", help="Output model directory (new, or an obert output with --overwrite)")
GLUE_TASK = typer.Option(None, "--task", help="GLUE task name instead of files (needs the hub)")
TOKENIZER = typer.Option(None, "--tokenizer", help="Tokenizer (hub id or directory) when the model directory has none")


@app.command()
def finetune(
    model: str = typer.Argument(..., help="Hub id or local model directory"),
    out: Path = OUT_MODEL,
    train_file: Optional[str] = typer.Option(None, help="Training data (.jsonl/.csv: text[, text_pair], label)"),
    eval_file: Optional[str] = typer.Option(None, help="Evaluation data (same format)"),
    task: Optional[str] = GLUE_TASK,
    epochs: float = typer.Option(3.0, parser=POSITIVE, help="Training epochs"),
    lr: float = typer.Option(5e-5, parser=POSITIVE, help="Peak learning rate (AdamW)"),
    lr_scheduler: str = typer.Option("linear", help=", ".join(LR_SCHEDULERS)),
    batch_size: int = typer.Option(32, parser=COUNT),
    max_length: Optional[int] = typer.Option(None, parser=LENGTH, help="Tokens per example, longer ones truncated (default 128, or the model's limit when shorter)"),
    max_train_rows: Optional[int] = typer.Option(None, parser=COUNT, help="Use a random subset of this many rows"),
    seed: int = typer.Option(0, parser=SEED),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if present)"),
    tokenizer: Optional[str] = TOKENIZER,
    reinit_head: bool = typer.Option(False, "--reinit-head", help="Train a new classification head (when the model's labels differ from the data's)"),
    lock_mask: bool = typer.Option(True, "--lock-mask/--no-lock-mask", help="A pruned model (1%+ of its prunable weights zero) keeps its zeros (sparse transfer)"),
    overwrite: bool = OVERWRITE,
) -> None:
    """Fine-tuning of a sequence classifier: the dense task model you then prune, or sparse
    transfer of a pruned one (its zeros kept)."""
    from obert.tasks.data import training_labels
    from obert.io import check_output, claim_output, save_model_dir
    from obert.model.loading import check_finite, check_length
    from obert.device import pick_device
    from obert.tasks.classification import evaluate, load_classifier
    from obert.card import model_card
    from obert.model.masks import locked_record
    from obert.training.callback import MaskLockCallback, lock_note, pruned_masks
    from obert.training.finetune import finetune as run_finetune

    if lr_scheduler not in LR_SCHEDULERS:
        raise ObertError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{lr_scheduler}'")
    target = pick_device(device)
    out = check_output(out, inputs=[model, train_file, eval_file, tokenizer], overwrite=overwrite)
    with claim_output(out):
        all_train = _data(train_file, task, "train")
        eval_rows = _data(eval_file, task if eval_file is None else None, "eval", required=False)
        labels = training_labels(all_train, eval_rows)
        train_rows = all_train.subset(max_train_rows, seed)
        tok, net = load_classifier(model, labels, tokenizer=tokenizer, reinit_head=reinit_head,
                                   log=typer.echo)
        max_length = check_length(max_length, net.config, "--max-length", tok)
        net.to(target)
        train_ds = _encode(train_rows, tok, net, max_length)
        eval_ds = _encode(eval_rows, tok, net, max_length)
        locked = pruned_masks(net) if lock_mask else None
        lock = [MaskLockCallback(locked)] if locked is not None else []
        if locked is not None:
            typer.echo(f"{lock_note(model, locked)} (--no-lock-mask refills them)")
        t0 = time.perf_counter()
        run_finetune(net, tok, train_ds, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                     lr_scheduler=lr_scheduler, callbacks=lock)
        check_finite(net, "the fine-tuned model (training diverged: lower --lr)")
        metrics = {"train_seconds": time.perf_counter() - t0, "train_rows": len(train_ds)}
        if eval_ds is not None:
            metrics.update(evaluate(net, eval_ds))
            typer.echo(f"eval accuracy: {metrics['accuracy']:.4f} ({metrics['num_examples']} examples)")
        files = {"metrics.json": metrics}
        if lock:
            files["sparsity.json"] = locked_record(lock[0].masks, model)
        what = [f"fine-tuned on {train_file or task} ({len(train_ds)} rows) for {epochs:g} epochs, "
                f"lr {lr:g} ({lr_scheduler}), batch {batch_size}, length {max_length} (`obert finetune`)"]
        if lock:
            what.append("the starting model's zeros kept (mask locked: sparse transfer)")
        files["README.md"] = model_card(out.name, what=what, source=model,
                                        sparsity=files.get("sparsity.json"), metrics=metrics)
        save_model_dir(out, net, tok, files, overwrite=overwrite)
        typer.echo(f"saved {out}")


@app.command()
@with_settings(PruneConfig)
def prune(
    model: str = typer.Argument(..., help="Fine-tuned model (hub id or local directory)"),
    out: Path = OUT_MODEL,
    train_file: Optional[str] = typer.Option(None, help="Training data for the gradients"),
    eval_file: Optional[str] = typer.Option(None, help="Evaluate before and after pruning"),
    task: Optional[str] = GLUE_TASK,
    include: Optional[list[str]] = typer.Option(None, help="Regex of Linear module names to prune (repeatable)"),
    exclude: Optional[list[str]] = typer.Option(None, help="Regex of module names to keep dense (repeatable)"),
    max_length: Optional[int] = typer.Option(None, parser=LENGTH, help="Tokens per example (default 128, or the model's limit when shorter)"),
    eval_batch_size: int = typer.Option(64, parser=COUNT),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if present)"),
    tokenizer: Optional[str] = TOKENIZER,
    overwrite: bool = OVERWRITE,
    **settings,
) -> None:
    """One-shot pruning to a target sparsity; writes a HF model dir with sparsity.json."""
    from obert.io import check_output, claim_output
    from obert.pruning.methods import METHODS
    from obert.training.oneshot import run_prune
    from obert.model.targets import compile_patterns
    from obert.device import pick_device

    config = PruneConfig(**given_settings(PruneConfig, settings))
    compile_patterns(include, "--include")
    compile_patterns(exclude, "--exclude")
    pick_device(device)
    out = check_output(out, inputs=[model, train_file, eval_file, tokenizer], overwrite=overwrite)
    with claim_output(out):
        needs_train = METHODS[config.method].needs_gradients
        train_rows = _data(train_file, task, "train", required=needs_train)
        eval_rows = _data(eval_file, task if eval_file is None else None, "eval", required=False)
        result = run_prune(model, config, train_rows, eval_rows, out=out, include=include,
                           exclude=exclude, max_length=max_length, eval_batch_size=eval_batch_size,
                           device=device, tokenizer=tokenizer, overwrite=overwrite)
        if "accuracy_before" in result:
            typer.echo(f"accuracy before: {result['accuracy_before']:.4f}  after: "
                       f"{result['accuracy_after']:.4f}")
        typer.echo(f"sparsity {result['global_sparsity']:.4f}; saved {out}")


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", help="YAML recipe (see recipes/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a field: section.key=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint"),
    force_recipe: bool = typer.Option(False, "--force-recipe", help="Resume although the recipe's settings changed since the checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier obert output at output_dir"),
    keep_checkpoints: bool = typer.Option(False, help="Keep OUT.checkpoints/ after a successful run"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars"),
) -> None:
    """Gradual pruning while fine-tuning (cubic schedule, oBERT or magnitude, distillation)."""
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe, read_recipe_doc
    from obert.training.stages import load_staged, run_stages

    doc = read_recipe_doc(recipe)
    if "stages" in doc:
        staged = load_staged(recipe, set_ or [], doc=doc)
        run_stages(staged, resume=resume, overwrite=overwrite, keep_checkpoints=keep_checkpoints,
                   progress=not no_progress, force_recipe=force_recipe, inputs=[recipe],
                   log=typer.echo)
        typer.echo(f"all {len(staged.stages)} stages done; last output {staged.stage_dirs()[-1]}")
        return
    r = load_recipe(recipe, set_ or [], doc=doc)
    metrics = run_recipe(r, resume=resume, keep_checkpoints=keep_checkpoints, progress=not no_progress,
                         overwrite=overwrite, force_recipe=force_recipe, inputs=[recipe])
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1", "exact_match")
                          if k in metrics)
        typer.echo(f"{shown}; sparsity {metrics['global_sparsity']:.4f}; saved {r.output_dir}")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ObertError(f"--keep expects layer indices like 0,2,4, got '{text}'") from None


@app.command("drop-layers")
def drop_layers(
    model: str = typer.Argument(..., help="Model directory or hub id (an encoder: pre-trained, masked LM, classifier or QA)"),
    out: Path = OUT_MODEL,
    keep: Optional[str] = typer.Option(None, help="Layers to keep, indices from 0 in increasing order (e.g. 0,2,4)"),
    num_layers: Optional[int] = typer.Option(None, parser=COUNT, help="Keep this many layers, evenly spaced (the first and the last kept)"),
    tokenizer: Optional[str] = TOKENIZER,
    overwrite: bool = OVERWRITE,
) -> None:
    """Keep some of the encoder's transformer layers (the rest of the model unchanged)."""
    from obert.training.layers import drop_layers_dir

    if (keep is None) == (num_layers is None):
        raise ObertError("give --keep or --num-layers (one of them)")
    kept, total = drop_layers_dir(model, out, keep=_layer_list(keep) if keep is not None else None,
                                  num_layers=num_layers, tokenizer=tokenizer, overwrite=overwrite,
                                  log=typer.echo)
    typer.echo(f"kept layers {','.join(map(str, kept))} of {total}; saved {out}")


@app.command("compile")
def compile_model(
    model: str = typer.Argument(..., help="Pruned model directory (or hub id)"),
    out: Path = typer.Option(..., "--out", help="Output directory of the compiled model (new, or an obert output with --overwrite)"),
    dtype: str = typer.Option("float32", help="float32, or int8 (layers dense or pruned in blocks of 4; others float32)"),
    min_sparsity: Optional[float] = typer.Option(None, parser=number(ge=0, le=1), help="Compile layers at least this sparse (default: per kernel)"),
    calibration_file: Optional[str] = typer.Option(None, help="int8: text (.jsonl/.csv, as for training) whose activations calibrate OBS rounding of the weights"),
    task: Optional[str] = typer.Option(None, help="int8: GLUE task whose train split calibrates (needs the hub)"),
    calibration_rows: int = typer.Option(512, parser=COUNT, help="Rows of calibration text (a random subset)"),
    max_length: Optional[int] = typer.Option(None, parser=LENGTH, help="Tokens per calibration row (default 128, or the model's limit when shorter)"),
    seed: int = typer.Option(0, parser=SEED),
    choose: str = typer.Option("speed", help="speed: time each layer here and keep it dense where dense torch is faster; sparsity: sparse wherever the threshold is reached"),
    choose_tokens: int = typer.Option(256, parser=COUNT, help="Tokens per call the speed choice is timed at"),
    tokenizer: Optional[str] = TOKENIZER,
    overwrite: bool = OVERWRITE,
) -> None:
    """Compile a pruned model for sparse CPU inference and save it (obert.runtime.load_compiled)."""
    from obert.io import check_output, claim_output
    from obert.model.loading import ENCODER, check_length, load_tokenizer, model_kind
    from obert.runtime import compile as compile_runtime, save_compiled
    from obert.runtime.bench import load_model
    from obert.runtime.calibrate import text_batches
    from obert.runtime.compile import compiled_card, trained_layers

    if dtype not in ("float32", "int8"):
        raise ObertError(f"--dtype must be float32 or int8, got '{dtype}'")
    if choose not in ("speed", "sparsity"):
        raise ObertError(f"--choose must be speed or sparsity, got '{choose}'")
    calibrate = calibration_file is not None or task is not None
    if calibration_file is not None and task is not None:
        raise ObertError("give --calibration-file or --task, not both")
    if calibrate and dtype != "int8":
        raise ObertError("calibration rounds int8 weights: add --dtype int8")
    if calibrate and (Path(model) / "quantization.json").is_file():
        raise ObertError(f"{model} was trained quantisation-aware: its weights are on the int8 "
                         "grid already; compile it without calibration")
    out = check_output(out, inputs=[model, calibration_file, tokenizer], overwrite=overwrite)
    with claim_output(out):
        net = load_model(model)
        config = net.config
        if model_kind(config) == ENCODER and config.architectures and \
                not config.architectures[0].endswith("Model"):
            typer.echo(f"note: {model} is a {config.architectures[0]}: compiling its encoder only "
                       "(the pre-training head is not kept)")
        tok = None
        if calibrate or tokenizer is not None:
            tok = load_tokenizer(model, tokenizer, config)
            max_length = check_length(max_length, config, "--max-length", tok)
        else:
            try:  # saved next to the compiled model when there is one; not needed to compile
                tok = load_tokenizer(model, None, config)
            except ObertError as exc:
                typer.echo(f"note: no tokenizer saved with the compiled model ({exc})")
        batches = None
        if calibrate:
            rows = _data(calibration_file, task, "train", option="--calibration-file").subset(
                calibration_rows, seed)
            batches = text_batches(tok, rows.texts, rows.pairs, max_length=max_length)
        report = compile_runtime(net, dtype=dtype, min_sparsity=min_sparsity, calibration=batches,
                                 choose=choose, tokens=choose_tokens, trained_int8=trained_layers(model))
        report.check(model, dtype)
        save_compiled(net, out, tok, overwrite=overwrite,
                      extra={"README.md": compiled_card(out.name, model, report, dtype)})
        rounding = f"; int8 weights by {'OBS rounding' if report.int8_rounding == 'obs' else 'rounding to nearest'}" \
            if report.int8_layers else ""
        typer.echo(report.layer_table())
        typer.echo(f"{report.summary()}{rounding}; saved {out}")


@app.command()
def export(
    model: str = typer.Argument(..., help="Model directory (a classifier, QA model or encoder; pruned or trained quantisation-aware)"),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file"),
) -> None:
    """ONNX export, checked in ONNX Runtime; a quantisation-aware-trained model exports in QDQ
    form (int8 weights, inputs quantised per token as obert's int8 kernels do)."""
    from obert.io import atomic_file, check_file_output
    from obert.runtime.bench import load_model
    from obert.runtime.compile import trained_layers
    from obert.runtime.onnx_export import check_onnx, export_onnx, export_qdq

    out = check_file_output(out, inputs=[model], overwrite=overwrite, option="--out")
    if out.suffix.lower() != ".onnx":
        raise ObertError(f"--out {out}: give a .onnx file name")
    net = load_model(model)
    layers = trained_layers(model) or []
    with atomic_file(out) as tmp:
        if layers:
            export_qdq(net, tmp, layers)
        else:
            export_onnx(net, tmp)
        diff = check_onnx(net, tmp, int8_layers=layers or None)
    kind = f"QDQ, {len(layers)} int8 layers" if layers else "float32"
    typer.echo(f"saved {out} ({kind}); max |ONNX Runtime - PyTorch| on random tokens: {diff:.2e}"
               + (" (session option session.disable_quant_qdq=1)" if layers else ""))


@app.command()
def bench(
    model: str = typer.Argument(..., help="Pruned model directory (or hub id)"),
    batch_size: int = typer.Option(16, parser=COUNT, help="Sequences per batch"),
    seq_len: Optional[int] = typer.Option(None, parser=COUNT, help="Tokens per sequence (default 128, or the model's limit when shorter)"),
    threads: Optional[int] = typer.Option(None, parser=COUNT, help="CPU threads (default: PyTorch's)"),
    rounds: int = typer.Option(5, parser=COUNT, help="Interleaved timing rounds"),
    iters: int = typer.Option(3, parser=COUNT, help="Timed calls per variant and round"),
    int8: Optional[bool] = typer.Option(None, "--int8/--no-int8", help="Measure the int8 path (default: when some layer is dense or block4)"),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also measure dense ONNX Runtime fp32 and int8"),
    choose: str = typer.Option("speed", help="How compile picks sparse layers: speed (timed here) or sparsity"),
    plot: Optional[Path] = typer.Option(None, help="Write a chart (PNG)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --plot / --json files"),
) -> None:
    """Throughput of the same model dense vs sparse on this CPU (like for like)."""
    from obert.io import atomic_file, check_file_output, write_json
    from obert.runtime.bench import format_table, plot as plot_chart, run_bench

    plot, json_out = (check_file_output(p, inputs=[model], overwrite=overwrite, option=o)
                      if p is not None else None for p, o in ((plot, "--plot"), (json_out, "--json")))
    if plot is not None and json_out is not None and plot.resolve() == json_out.resolve():
        raise ObertError("--plot and --json name the same file")
    if plot is not None:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if plot.suffix.lstrip(".").lower() not in formats:
            raise ObertError(f"--plot {plot}: unknown image type '{plot.suffix}' (use "
                             f"{', '.join('.' + f for f in sorted(formats))})")
    if threads is not None and threads > (os.cpu_count() or 1):
        raise ObertError(f"--threads {threads} is more than this machine's {os.cpu_count()} CPUs")
    if choose not in ("speed", "sparsity"):
        raise ObertError(f"--choose must be speed or sparsity, got '{choose}'")
    result = run_bench(model, batch=batch_size, seq_len=seq_len, threads=threads, rounds=rounds,
                       iters=iters, onnx=onnx, int8=int8, choose=choose)
    typer.echo(format_table(result))
    if plot is not None:
        with atomic_file(plot) as tmp:
            plot_chart(result, tmp)
    if json_out is not None:
        write_json(json_out, result)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the process is so outputs are cleaned up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Never(Exception):
    """Stands in for an exception class the installed click does not have."""


def _terminate(signum, frame):
    raise Terminated(signum)


OUT_OF_MEMORY = ("out of memory: lower --batch-size or --max-length (pruning: --num-grads, "
                 "--fisher-block-size or --max-memory)")


def _is_out_of_memory(exc: BaseException) -> bool:
    """PyTorch reports allocation failures as RuntimeError (CPU) or OutOfMemoryError (CUDA)."""
    import torch

    return isinstance(exc, getattr(torch, "OutOfMemoryError", MemoryError)) or \
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def _fail(message: str, code: int) -> int:
    try:  # a progress bar cut short by the error would otherwise share its line
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except ImportError:
        pass
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns every outcome into one line and an exit code."""
    try:  # Typer bundles its own copy of click from 0.16 on; older ones use the click package
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors
    ClickException = click_errors.ClickException
    Abort = getattr(click_errors, "Abort", _Never)  # Typer's own copy has none
    NoArgsIsHelpError = getattr(click_errors, "NoArgsIsHelpError", _Never)

    debug = bool(os.environ.get("OBERT_DEBUG"))
    # Signal handlers can only be set from the main thread (a test may call main elsewhere).
    on_main_thread = threading.current_thread() is threading.main_thread()
    # A signal the caller set to be ignored stays ignored (``nohup`` ignores SIGHUP).
    caught = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    caught = [s for s in caught if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _terminate) for s in caught} if on_main_thread else {}
    try:
        for command in app.registered_commands:
            if hasattr(command.callback, "settings_model"):
                attach_settings(command.callback)
        rv = app(args=argv, standalone_mode=False)
        if rv in (0, None):
            from obert.distributed import finish

            finish()  # a torchrun job that succeeded leaves its process group cleanly
    except NoArgsIsHelpError:
        return 2  # the help is already printed: it is the message
    except (KeyboardInterrupt, Abort):  # older click reports Ctrl-C as Abort
        return _fail("interrupted", 130)
    except Terminated as exc:
        return _fail(f"terminated ({signal.Signals(exc.signum).name})", 128 + exc.signum)
    except ObertError as exc:
        if debug:
            raise
        return _fail((str(exc).strip().splitlines() or ["failed"])[0], 2)
    except ClickException as exc:  # usage errors: they name the option and the expected values
        return _fail((exc.format_message().strip().splitlines() or [type(exc).__name__])[0],
                     exc.exit_code)
    except MemoryError:
        return _fail(OUT_OF_MEMORY, 1)
    except PermissionError as exc:  # a path the user gave that this user may not use
        return _fail(f"permission denied: {exc.filename or exc}", 2)
    except Exception as exc:
        if debug:
            raise
        if _is_out_of_memory(exc):
            return _fail(OUT_OF_MEMORY, 1)
        return _fail(f"{type(exc).__name__}: {first_line(exc)} (set OBERT_DEBUG=1 for a traceback)", 1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rv == 130:  # Typer turns Ctrl-C into this return value
        return _fail("interrupted", 130)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
