"""The ``obert`` command line: ``finetune``, ``prune``, ``train``, ``compile`` and ``bench``.

User errors print one line (``error: ...``) and exit 2; nothing half-written is left in ``--out``.
Set ``OBERT_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import ObertError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Second-order (oBERT) pruning of Hugging Face encoder models.")


def _data(file: Optional[str], task: Optional[str], split: str, required: bool = True):
    from .data import load_data

    if file is None and task is None:
        if required:
            raise ObertError(f"give --{'train' if split == 'train' else 'eval'}-file or --task")
        return None
    return load_data(file, task, split)


def _encode(rows, tokenizer, model, max_length: int):
    from .data import Encoded, label_map_from_config

    return None if rows is None else Encoded(rows, tokenizer, label_map_from_config(model.config),
                                             max_length)


@app.command()
def finetune(
    model: str = typer.Argument(..., help="Hub id or local model directory"),
    out: Path = typer.Option(..., "--out", help="Output model directory"),
    train_file: Optional[str] = typer.Option(None, help="Training data (.jsonl/.csv: text[, text_pair], label)"),
    eval_file: Optional[str] = typer.Option(None, help="Evaluation data (same format)"),
    task: Optional[str] = typer.Option(None, help="GLUE task name instead of files (needs the hub)"),
    epochs: float = typer.Option(3.0, help="Training epochs"),
    lr: float = typer.Option(5e-5, help="Peak learning rate (AdamW)"),
    lr_scheduler: str = typer.Option("linear", help="linear, constant, cosine, ..."),
    batch_size: int = typer.Option(32),
    max_length: int = typer.Option(128, help="Tokens per example (longer ones are truncated)"),
    max_train_rows: Optional[int] = typer.Option(None, help="Use a random subset of this many rows"),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if present)"),
) -> None:
    """Dense fine-tuning of a sequence classifier (the task model you then prune)."""
    from .data import label_list
    from .io import save_model_dir
    from .train import evaluate, finetune as run_finetune, load_classifier, pick_device

    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    all_train = _data(train_file, task, "train")
    eval_rows = _data(eval_file, task if eval_file is None else None, "eval", required=False)
    # Label ids come from every label seen in either split, so a subset still knows all classes.
    labels = label_list(all_train.labels + (eval_rows.labels if eval_rows else []))
    train_rows = all_train.subset(max_train_rows, seed)
    tokenizer, net = load_classifier(model, labels)
    net.to(pick_device(device))
    train_ds = _encode(train_rows, tokenizer, net, max_length)
    eval_ds = _encode(eval_rows, tokenizer, net, max_length)
    t0 = time.perf_counter()
    run_finetune(net, tokenizer, train_ds, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                 lr_scheduler=lr_scheduler)
    metrics = {"train_seconds": time.perf_counter() - t0, "train_rows": len(train_ds)}
    if eval_ds is not None:
        metrics.update(evaluate(net, eval_ds))
        typer.echo(f"eval accuracy: {metrics['accuracy']:.4f} ({metrics['num_examples']} examples)")
    save_model_dir(out, net, tokenizer, {"metrics.json": metrics})
    typer.echo(f"saved {out}")


@app.command()
def prune(
    model: str = typer.Argument(..., help="Fine-tuned model (hub id or local directory)"),
    out: Path = typer.Option(..., "--out", help="Output model directory"),
    sparsity: float = typer.Option(..., help="Target fraction of pruned weights, in [0, 1)"),
    train_file: Optional[str] = typer.Option(None, help="Training data for the gradients"),
    eval_file: Optional[str] = typer.Option(None, help="Evaluate before and after pruning"),
    task: Optional[str] = typer.Option(None, help="GLUE task name instead of files (needs the hub)"),
    method: str = typer.Option("obert", help="obert or magnitude"),
    structure: str = typer.Option("unstructured", help="unstructured or block4 (4 consecutive input weights)"),
    scope: str = typer.Option("global", help="global (one threshold) or uniform (same sparsity per layer)"),
    num_grads: int = typer.Option(256, help="m: mini-batch gradients for the Fisher (paper: 1024)"),
    grad_batch_size: int = typer.Option(16, help="Examples per gradient mini-batch"),
    fisher_block_size: Optional[int] = typer.Option(None, help="B (default 50; 32 for block4)"),
    damp: float = typer.Option(1e-7, help="Fisher damping lambda (absolute)"),
    num_recomputations: int = typer.Option(1, help="Reach the target in R steps, re-estimating the Fisher"),
    update: str = typer.Option("joint", help="joint (exact per-block OBS) or independent (paper)"),
    include: Optional[list[str]] = typer.Option(None, help="Regex of Linear module names to prune (repeatable)"),
    exclude: Optional[list[str]] = typer.Option(None, help="Regex of module names to keep dense (repeatable)"),
    max_length: int = typer.Option(128),
    eval_batch_size: int = typer.Option(64),
    max_memory: Optional[float] = typer.Option(None, help="GiB for Fisher blocks (default: 80% of free)"),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if present)"),
) -> None:
    """One-shot pruning to a target sparsity; writes a HF model dir with sparsity.json."""
    from .methods import PruneConfig
    from .oneshot import run_prune

    config = PruneConfig(sparsity=sparsity, method=method, structure=structure, scope=scope,
                         num_grads=num_grads, grad_batch_size=grad_batch_size,
                         fisher_block_size=fisher_block_size, damp=damp,
                         num_recomputations=num_recomputations, update=update,
                         max_memory_gb=max_memory, seed=seed)
    needs_train = method == "obert"
    train_rows = _data(train_file, task, "train", required=needs_train)
    eval_rows = _data(eval_file, task if eval_file is None else None, "eval", required=False)
    result = run_prune(model, config, train_rows, eval_rows, out=out, include=include,
                       exclude=exclude, max_length=max_length, eval_batch_size=eval_batch_size,
                       device=device)
    if "accuracy_before" in result:
        typer.echo(f"accuracy before: {result['accuracy_before']:.4f}  after: "
                   f"{result['accuracy_after']:.4f}")
    typer.echo(f"sparsity {result['global_sparsity']:.4f}; saved {out}")


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", help="YAML recipe (see recipes/)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a field: section.key=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint"),
    keep_checkpoints: bool = typer.Option(False, help="Keep OUT.checkpoints/ after a successful run"),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars"),
) -> None:
    """Gradual pruning while fine-tuning (cubic schedule, oBERT or magnitude, distillation)."""
    from .gradual import run_recipe
    from .recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    metrics = run_recipe(r, resume=resume, keep_checkpoints=keep_checkpoints, progress=not no_progress)
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("accuracy", "f1", "exact_match")
                          if k in metrics)
        typer.echo(f"{shown}; sparsity {metrics['global_sparsity']:.4f}; saved {r.output_dir}")


@app.command("compile")
def compile_model(
    model: str = typer.Argument(..., help="Pruned model directory (or hub id)"),
    out: Path = typer.Option(..., "--out", help="Output directory of the compiled model"),
    dtype: str = typer.Option("float32", help="float32, or int8 (block4 layers; others float32)"),
    min_sparsity: Optional[float] = typer.Option(None, help="Compile layers at least this sparse (default: per kernel)"),
    calibration_file: Optional[str] = typer.Option(None, help="int8: text (.jsonl/.csv, as for training) whose activations calibrate OBS rounding of the weights"),
    task: Optional[str] = typer.Option(None, help="int8: GLUE task whose train split calibrates (needs the hub)"),
    calibration_rows: int = typer.Option(512, help="Rows of calibration text (a random subset)"),
    max_length: int = typer.Option(128, help="Tokens per calibration row"),
    seed: int = typer.Option(0),
) -> None:
    """Compile a pruned model for sparse CPU inference and save it (obert.runtime.load_compiled)."""
    from transformers import AutoTokenizer

    from .runtime import compile as compile_runtime, save_compiled
    from .runtime.bench import load_model
    from .runtime.calibrate import text_batches

    if dtype not in ("float32", "int8"):
        raise ObertError(f"--dtype must be float32 or int8, got '{dtype}'")
    if min_sparsity is not None and not 0 <= min_sparsity <= 1:
        raise ObertError(f"--min-sparsity must be in [0, 1], got {min_sparsity}")
    _check_positive(calibration_rows=calibration_rows, max_length=max_length)
    calibrate = calibration_file is not None or task is not None
    if calibrate and dtype != "int8":
        raise ObertError("calibration rounds int8 weights: add --dtype int8")
    net = load_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        if calibrate:
            raise ObertError(f"calibration needs the model's tokenizer: {exc}") from exc
        tokenizer = None
    batches = None
    if calibrate:
        rows = _data(calibration_file, task, "train").subset(calibration_rows, seed)
        batches = text_batches(tokenizer, rows.texts, rows.pairs, max_length=max_length)
    report = compile_runtime(net, dtype=dtype, min_sparsity=min_sparsity, calibration=batches)
    if not report.sparse_layers:
        raise ObertError(f"no Linear layer of {model} reaches the sparsity threshold: nothing to compile")
    save_compiled(net, out, tokenizer)
    rounding = f"; int8 weights by {'OBS rounding' if report.int8_rounding == 'obs' else 'rounding to nearest'}" \
        if dtype == "int8" else ""
    typer.echo(f"{report.summary()}{rounding}; saved {out}")


@app.command()
def bench(
    model: str = typer.Argument(..., help="Pruned model directory (or hub id)"),
    batch_size: int = typer.Option(16, help="Sequences per batch"),
    seq_len: int = typer.Option(128, help="Tokens per sequence"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: PyTorch's)"),
    rounds: int = typer.Option(5, help="Interleaved timing rounds"),
    iters: int = typer.Option(3, help="Timed calls per variant and round"),
    int8: Optional[bool] = typer.Option(None, "--int8/--no-int8", help="Measure the int8 block4 path (default: when block4)"),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Also measure dense ONNX Runtime fp32 and int8"),
    plot: Optional[Path] = typer.Option(None, help="Write a chart (PNG)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON"),
) -> None:
    """Throughput of the same model dense vs sparse on this CPU (like for like)."""
    from .io import write_json
    from .runtime.bench import format_table, plot as plot_chart, run_bench

    _check_positive(batch_size=batch_size, seq_len=seq_len, rounds=rounds, iters=iters)
    if threads is not None:
        _check_positive(threads=threads)
    result = run_bench(model, batch=batch_size, seq_len=seq_len, threads=threads, rounds=rounds,
                       iters=iters, onnx=onnx, int8=int8)
    typer.echo(format_table(result))
    if plot is not None:
        plot_chart(result, plot)
    if json_out is not None:
        write_json(json_out, result)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ObertError(f"--{name.replace('_', '-')} must be positive, got {v}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except ObertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (typer.Exit,) as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors and anything unexpected: still one line
        import click

        if os.environ.get("OBERT_DEBUG"):
            raise
        if isinstance(exc, click.exceptions.ClickException):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            return 130
        if isinstance(exc, MemoryError):
            print("error: out of memory (lower --num-grads, --fisher-block-size or --max-memory)",
                  file=sys.stderr)
            return 1
        print(f"error: {type(exc).__name__}: {exc} (set OBERT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
