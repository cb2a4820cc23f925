"""The CLI under careless and hostile input, by class of mistake rather than by example.

Every refusal is checked the same way (``refused``): exit code 2 (or the one stated), exactly one
line on stderr starting ``error:`` and naming what was wrong, no traceback, and the files around
the run byte-for-byte as they were (nothing written, nothing removed). To add a case, add a row to
the table of its class; the checks come with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (block4_pruned_dir, make_rows, make_tokenizer, tiny_config, tiny_model,
                      write_jsonl)

from obert.cli.main import app, main

# ---------------------------------------------------------------------------------------------
# The harness


def snapshot(*roots: Path) -> dict:
    """Every file and directory under ``roots``: kind, mode and content hash."""
    seen = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[str(p)] = ("dir", p.stat().st_mode)
            else:
                seen[str(p)] = ("file", p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return seen


def run(*args) -> int:
    return main([str(a) for a in args])


def refused(capsys, args, says: str | list[str], code: int = 2, roots=()) -> str:
    """Run the CLI; it must exit ``code`` with one ``error:`` line containing ``says`` and
    leave every file under ``roots`` exactly as it was. Returns the error line."""
    before = snapshot(*roots)
    capsys.readouterr()
    rc = run(*args)
    err = capsys.readouterr().err.strip()
    assert rc == code, f"exit {rc}, stderr: {err}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for text in [says] if isinstance(says, str) else says:
        assert text in err, f"{text!r} not in {err!r}"
    assert snapshot(*roots) == before, "a refused command changed files"
    return err


class Env:
    """A tiny classifier with its tokenizer, data files and helpers, all under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.model = root / "model"
        tiny_model("bert").save_pretrained(self.model)
        make_tokenizer(root).save_pretrained(self.model)
        self.train = Path(write_jsonl(root / "train.jsonl", make_rows(96, 0)))
        self.eval = Path(write_jsonl(root / "eval.jsonl", make_rows(48, 1)))
        self._pruned = None

    @property
    def pruned(self) -> Path:
        """The tiny model with 70% of each block's weights zero in groups of 4 (compilable)."""
        if self._pruned is None:
            self._pruned = block4_pruned_dir(self.model, self.root / "pruned")[0]
        return self._pruned

    def recipe(self, name: str = "recipe.yaml", **sections) -> Path:
        doc = {"model": {"path": str(self.model)},
               "data": {"train_file": str(self.train), "eval_file": str(self.eval)},
               "training": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 16,
                            "seed": 0, "save_every_epochs": 0.5},
               "pruning": {"method": "magnitude", "init_sparsity": 0.3, "final_sparsity": 0.5,
                           "start_epoch": 0, "end_epoch": 1, "frequency": 1},
               "output_dir": str(self.root / "trained")}
        for section, value in sections.items():
            doc[section] = {**doc.get(section, {}), **value} if isinstance(value, dict) else value
        path = self.root / name
        path.write_text(yaml.safe_dump(doc))
        return path


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path / "env")


# How each command writes to a directory output (``out``), with fast valid settings.
DIR_COMMANDS = {
    "prune": lambda e, out: ["prune", e.model, "--sparsity", 0.5, "--method", "magnitude",
                             "--max-length", 16, "--out", out],
    "finetune": lambda e, out: ["finetune", e.model, "--train-file", e.train, "--epochs", 1,
                                "--max-length", 16, "--out", out],
    "compile": lambda e, out: ["compile", e.pruned, "--out", out],
    "drop-layers": lambda e, out: ["drop-layers", e.model, "--num-layers", 1, "--out", out],
    "train": lambda e, out: ["train", "--recipe", e.recipe(output_dir=str(out)), "--no-progress"],
}

# ---------------------------------------------------------------------------------------------
# Outputs: refused unless new, empty, or an earlier obert output with --overwrite


def _situation(kind: str, command: str, e: Env, tmp: Path, monkeypatch) -> tuple[Path, str]:
    """Build an output path of ``kind``; returns it and a word the refusal must contain."""
    if kind == "input model":
        return (e.pruned if command == "compile" else e.model), "input"
    if kind == "dir holding the inputs":
        return e.root, "input"
    if kind == "working directory":
        work = tmp / "work"
        work.mkdir()
        (work / "notes.txt").write_text("mine\n")
        monkeypatch.chdir(work)
        return Path("."), "working directory"
    if kind == "above the working directory":
        work = tmp / "deep" / "work"
        work.mkdir(parents=True)
        monkeypatch.chdir(work)
        return Path(".."), "working directory"
    if kind == "regular file":
        f = tmp / "results.txt"
        f.write_text("keep me\n")
        return f, "file"
    if kind == "foreign directory":
        d = tmp / "project"
        d.mkdir()
        (d / "data.csv").write_text("a,b\n")
        return d, "did not write"
    if kind == "symlinked directory":
        (tmp / "real").mkdir()
        (tmp / "link").symlink_to(tmp / "real")
        return tmp / "link", "symbolic link"
    if kind == "earlier output, no --overwrite":
        d = tmp / "earlier"
        assert run(*DIR_COMMANDS["prune"](e, d)) == 0
        return d, "--overwrite"
    if kind == "parent is a file":
        (tmp / "plain").write_text("x\n")
        return tmp / "plain" / "out", "not a directory"
    if kind == "unwritable place":
        return Path("/proc/obert-test-output"), "cannot write"
    raise ValueError(kind)


OUTPUT_REFUSALS = ["input model", "dir holding the inputs", "working directory",
                   "above the working directory", "regular file", "foreign directory",
                   "symlinked directory", "earlier output, no --overwrite", "parent is a file",
                   "unwritable place"]


@pytest.mark.parametrize("command", sorted(DIR_COMMANDS))
@pytest.mark.parametrize("kind", OUTPUT_REFUSALS)
def test_output_refused_before_any_work(command, kind, env, tmp_path, monkeypatch, capsys):
    if command == "compile":
        env.pruned  # built before the snapshot
    out, says = _situation(kind, command, env, tmp_path, monkeypatch)
    refused(capsys, DIR_COMMANDS[command](env, out), says, roots=[tmp_path])


@pytest.mark.parametrize("command", sorted(DIR_COMMANDS))
def test_output_written_new_empty_or_overwritten(command, env, tmp_path, capsys):
    fresh = tmp_path / "a" / "b" / "new"
    assert run(*DIR_COMMANDS[command](env, fresh)) == 0
    assert (fresh / ".obert_output").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*DIR_COMMANDS[command](env, empty)) == 0
    assert (empty / ".obert_output").is_file()
    (fresh / "stale.txt").write_text("from before\n")
    assert run(*DIR_COMMANDS[command](env, fresh), "--overwrite") == 0
    assert not (fresh / "stale.txt").exists() and (fresh / ".obert_output").is_file()
    leftovers = [p.name for p in tmp_path.rglob(".*obert-*")]
    assert leftovers == [], leftovers


def test_an_earlier_output_given_as_input_is_not_replaced(env, tmp_path, monkeypatch, capsys):
    """The input check alone guards here: the directory is obert's and --overwrite is given."""
    prev = tmp_path / "prev"
    assert run(*DIR_COMMANDS["prune"](env, prev)) == 0
    refused(capsys, ["prune", prev, "--sparsity", 0.6, "--method", "magnitude", "--max-length",
                     16, "--out", prev, "--overwrite"], "input", roots=[tmp_path])
    monkeypatch.setenv("HOME", str(tmp_path))  # the same with ~ on both sides, quoted
    refused(capsys, ["prune", "~/prev", "--sparsity", 0.6, "--method", "magnitude",
                     "--max-length", 16, "--out", "~/prev", "--overwrite"], "input",
            roots=[tmp_path])


def test_interrupt_between_the_renames_keeps_the_earlier_output(env, tmp_path, monkeypatch):
    from obert import io

    out = tmp_path / "out"
    assert run(*DIR_COMMANDS["prune"](env, out)) == 0
    before = snapshot(out)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out has been moved aside; the new one is not in place yet
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new\n")
    monkeypatch.setattr(io.os, "replace", real)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.glob(".out.obert-*")] == []


def test_a_killed_rename_is_restored_by_the_next_run(tmp_path):
    import socket

    from obert.io import clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".out.obert-old-{socket.gethostname()}-{dead}-ab12"
    aside.mkdir()
    (aside / "sparsity.json").write_text("{}\n")
    clean_stale(tmp_path / "out")
    assert (tmp_path / "out" / "sparsity.json").is_file() and not aside.exists()


def test_a_finished_result_is_kept_when_its_place_was_taken(tmp_path, capsys):
    from obert.errors import ObertError
    from obert.io import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(ObertError, match="kept in"):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_text("hours of work\n")
            out.mkdir()
            (out / "someone-else.txt").write_text("theirs\n")
    kept = list(tmp_path.glob(".out.obert-kept-*"))
    assert len(kept) == 1 and (kept[0] / "weights.bin").read_text() == "hours of work\n"
    assert (out / "someone-else.txt").read_text() == "theirs\n"


def test_a_signal_ignored_by_the_caller_stays_ignored(env, tmp_path, monkeypatch):
    seen = {}

    def record(*a, **k):
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        raise RuntimeError("stop here")

    monkeypatch.setattr("obert.training.oneshot.prune_model", record)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    try:
        assert run(*DIR_COMMANDS["prune"](env, tmp_path / "o")) == 1
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert seen["hup"] is signal.SIG_IGN and seen["term"] is not signal.SIG_DFL


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_permissions(umask, env, tmp_path):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert run(*DIR_COMMANDS["prune"](env, out)) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("sparsity.json", "model.safetensors", ".obert_output"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


BENCH = ["--batch-size", 1, "--rounds", 1, "--iters", 1, "--no-onnx", "--seq-len", 8]


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_file_outputs(option, env, tmp_path, capsys):
    name = "r.json" if option == "--json" else "r.png"
    roots = [tmp_path]
    refused(capsys, ["bench", env.pruned, *BENCH, option, env.pruned / name], "input", roots=roots)
    refused(capsys, ["bench", env.pruned, *BENCH, option, tmp_path], "directory", roots=roots)
    existing = tmp_path / name
    existing.write_text("keep\n")
    refused(capsys, ["bench", env.pruned, *BENCH, option, existing], "--overwrite", roots=roots)
    if option == "--plot":
        refused(capsys, ["bench", env.pruned, *BENCH, option, tmp_path / "r.txt"], "image type",
                roots=roots)
    assert run("bench", env.pruned, *BENCH, option, existing, "--overwrite") == 0
    assert existing.read_bytes() != b"keep\n"
    assert [p.name for p in tmp_path.glob(".*obert-*")] == []


# ---------------------------------------------------------------------------------------------
# Exit codes: 0 success, 2 usage, 130 Ctrl-C, 143 SIGTERM; temp directories gone


@pytest.mark.parametrize("args,says", [
    (["prune"], "Missing argument"),
    (["prune", "m", "--out", "o", "--sparsity", "0.5", "--frobnicate", "1"], "No such option"),
    (["bench", "m", "--threads", "abc"], "'--threads'"),
    (["prune", "m", "--out", "o", "--sparsity", "50%"], "'--sparsity'"),
    (["prune", "m", "--out", "o", "--sparsity", "0.5", "--method", "random"], "--method must be obert, magnitude, woodfisher, mfac, movement or soft-movement"),
    (["compile", "m", "--out", "o", "--dtype", "int4"], "--dtype must be float32 or int8"),
    (["finetune", "m", "--out", "o", "--lr-scheduler", "zigzag"], "--lr-scheduler must be one of"),
    (["prune", "m", "--out", "o", "--sparsity", "0.5", "--include", "(unclosed"], "--include '(unclosed' is not a valid regular expression"),
    (["prune", "m", "--out", "o", "--sparsity", "0.5", "--device", "tpu:9"], "device 'tpu:9'"),
    (["frobnicate"], "No such command"),
    (["bench", "m", "--threads", "100000"], "more than this machine's"),
    (["finetune", "m", "--out", "o", "--train-file", "t.jsonl", "--task", "sst2"], "not both"),
    (["train", "--recipe", "."], "recipe is a directory"),
    (["compile", "m", "--out", "o", "--dtype", "int8", "--calibration-file", "c.jsonl", "--task",
      "sst2"], "give --calibration-file or --task, not both"),
])
def test_usage_errors_exit_2_naming_the_option(args, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused(capsys, args, says, roots=[tmp_path])


def test_memory_checked_before_a_huge_batch(env, capsys):
    refused(capsys, ["bench", env.model, "--batch-size", 10**9, "--seq-len", 64, "--no-onnx"],
            ["GiB", "--batch-size"], roots=[env.root])


def test_int8_without_block4_layers_is_refused(env, tmp_path, capsys):
    pruned = tmp_path / "unstructured"
    assert run("prune", env.model, "--sparsity", 0.8, "--method", "magnitude", "--max-length", 16,
               "--out", pruned) == 0
    refused(capsys, ["compile", pruned, "--out", tmp_path / "c", "--dtype", "int8"],
            "--structure block4", roots=[tmp_path])


def test_a_second_run_on_the_same_output_is_refused_at_its_start(env, tmp_path, capsys):
    import socket

    out = tmp_path / "out"
    lock = tmp_path / ".out.obert-lock"
    lock.write_text(f"{socket.gethostname()}-{os.getpid()}\n")  # a live process holds it
    refused(capsys, DIR_COMMANDS["prune"](env, out), "another obert run", roots=[tmp_path])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock.write_text(f"{socket.gethostname()}-{dead}\n")  # left by a process that is gone
    assert run(*DIR_COMMANDS["prune"](env, out)) == 0
    assert not lock.exists() and (out / "sparsity.json").is_file()


def test_home_is_expanded_in_outputs(env, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert run(*DIR_COMMANDS["prune"](env, "~/pruned")) == 0
    assert (home / "pruned" / "sparsity.json").is_file() and not (tmp_path / "~").exists()


def test_bare_obert_prints_help_only(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "prune" in captured.out and "finetune" in captured.out
    assert "error" not in captured.err.lower()


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0 and "Usage" in capsys.readouterr().out


# A child that pauses while the output's temporary directory exists, so a test can signal it.
_PAUSED_SAVE = """
import signal, sys, time
import transformers
# As in a terminal: a test run started in the background of a shell without job control
# inherits SIGINT ignored, which no program sees.
signal.signal(signal.SIGINT, signal.default_int_handler)
save = transformers.PreTrainedModel.save_pretrained
def paused(self, *a, **k):
    save(self, *a, **k)
    open(sys.argv[1], "w").close()
    time.sleep(120)
transformers.PreTrainedModel.save_pretrained = paused
from obert.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _signal_while_saving(env: Env, tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    out, flag = tmp_path / "out", tmp_path / "saving"
    args = [str(a) for a in DIR_COMMANDS["prune"](env, out)]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_SAVE, str(flag), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached the save"
        time.sleep(0.1)
    assert list(tmp_path.glob(".out.obert-tmp-*")), "no temporary directory while saving"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


@pytest.mark.parametrize("sig,code,says", [(signal.SIGINT, 130, "error: interrupted"),
                                           (signal.SIGTERM, 143, "error: terminated (SIGTERM)")])
def test_interrupt_exits_nonzero_and_leaves_nothing(sig, code, says, env, tmp_path):
    done, out = _signal_while_saving(env, tmp_path, sig)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines()[-1] == says
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out.obert-*")) == []


def test_interrupt_while_the_command_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C before ``main`` runs (Python still importing the CLI) is 130 and one line too."""
    import types

    from obert.cli import console

    class Interrupted(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "obert.cli.main", Interrupted("obert.cli.main"))
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            console.run()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # for the shutdown that follows
    finally:
        signal.signal(signal.SIGINT, handler)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_console_script_is_the_guarded_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "obert"]
    assert script.value == "obert.cli.console:run"


def test_kill_9_leftovers_are_cleaned_by_the_next_run(env, tmp_path):
    done, out = _signal_while_saving(env, tmp_path, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".out.obert-tmp-*"))
    assert left and not out.exists()
    assert run(*DIR_COMMANDS["prune"](env, out)) == 0
    assert list(tmp_path.glob(".out.obert-*")) == [] and (out / "sparsity.json").is_file()


def test_only_a_dead_local_process_temporaries_are_removed(tmp_path):
    import socket

    from obert.io import clean_stale

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    names = {"dead dir": f".out.obert-tmp-{host}-{dead}-ab12",
             "dead file": f".r.json.obert-tmp-{host}-{dead}-cd34.json",
             "dead old": f".out.obert-old-{host}-{dead}-ef56",
             "live": f".out.obert-tmp-{host}-{os.getpid()}-0000",
             "other host": f".out.obert-tmp-elsewhere-{dead}-1111",
             "not ours": ".out.obert-tmp-notes"}
    for kind, name in names.items():
        (tmp_path / name).mkdir() if "file" not in kind else (tmp_path / name).write_text("{")
    clean_stale(tmp_path / "out")
    clean_stale(tmp_path / "r.json")
    left = {kind for kind, name in names.items() if (tmp_path / name).exists()}
    assert left == {"live", "other host", "not ours"}


def test_unexpected_errors_are_one_line_exit_1(env, tmp_path, monkeypatch, capsys):
    def explode(*a, **k):
        raise RuntimeError("first line\nsecond line\nthird")

    monkeypatch.setattr("obert.training.oneshot.prune_model", explode)
    refused(capsys, DIR_COMMANDS["prune"](env, tmp_path / "o"), "RuntimeError: first line",
            code=1, roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# Numbers: every numeric option and recipe field refuses NaN, infinities, negatives, non-numbers


def _numeric_options() -> list[tuple[str, str]]:
    """(command, --option) for every int/float option of every command, read from the CLI."""
    from obert.cli.main import attach_settings

    found = []
    for info in app.registered_commands:
        fn = info.callback
        if hasattr(fn, "settings_model"):
            attach_settings(fn)  # as main() does: the settings models' options
        hints = typing.get_type_hints(fn)
        for name, param in __import__("inspect").signature(fn).parameters.items():
            kind = hints[name]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            if kind in (int, float):
                decls = [d for d in getattr(param.default, "param_decls", ()) if d.startswith("--")]
                found.append((info.name or fn.__name__, decls[0] if decls else "--" + name.replace("_", "-")))
    return found


NUMERIC = _numeric_options()
ZERO_ALLOWED = {"--seed", "--sparsity", "--min-sparsity"}
# Valid arguments for each command (the number under test is appended and wins).
VALID = {
    "prune": lambda e, out: DIR_COMMANDS["prune"](e, out),
    "finetune": lambda e, out: DIR_COMMANDS["finetune"](e, out),
    "compile": lambda e, out: ["compile", e.model, "--out", out],
    "bench": lambda e, out: ["bench", e.model, "--no-onnx"],
    "drop-layers": lambda e, out: ["drop-layers", e.model, "--out", out],
}


def test_every_command_has_numeric_options_covered():
    commands = {c for c, _ in NUMERIC}
    assert commands == set(VALID), commands
    assert len(NUMERIC) >= 25, NUMERIC


@pytest.mark.parametrize("command,option", NUMERIC)
def test_numeric_option_refuses_bad_values(command, option, env, tmp_path, capsys):
    bad = ["nan", "inf", "-inf", "-1", "abc", "1e999"]
    if option not in ZERO_ALLOWED:
        bad.append("0")
    for value in bad:
        refused(capsys, [*VALID[command](env, tmp_path / "o"), option, value], option,
                roots=[tmp_path])


def _recipe_numeric_fields() -> list[str]:
    from obert.pruning.methods import METHODS
    from obert.training.recipe import Recipe

    fields = []
    for section, info in Recipe.model_fields.items():
        model = next((a for a in typing.get_args(info.annotation) if a is not type(None)),
                     info.annotation)
        found = dict(getattr(model, "model_fields", {}))
        if section == "pruning":  # and the methods' own settings (the default method's here)
            found.update(METHODS["obert"].Settings.model_fields)
        for name, f in found.items():
            kind = next((a for a in typing.get_args(f.annotation) if a is not type(None)), f.annotation)
            if typing.get_origin(kind) is typing.Annotated:  # a number with its bounds, or a word
                kind = typing.get_args(kind)[0]  # (damp: a number or auto)
            if kind in (int, float):
                fields.append(f"{section}.{name}")
    return fields


RECIPE_NUMERIC = _recipe_numeric_fields()


def test_recipe_numeric_fields_found():
    assert {"training.epochs", "pruning.damp", "distillation.temperature",
            "data.max_train_rows"} <= set(RECIPE_NUMERIC)


@pytest.mark.parametrize("field", RECIPE_NUMERIC)
def test_recipe_numeric_field_refuses_bad_values(field, env, tmp_path, capsys):
    recipe = env.recipe(distillation={"teacher": str(env.model)})
    for value in (".nan", ".inf", "-.inf", "-1", "abc", "true"):
        refused(capsys, ["train", "--recipe", recipe, "--set", f"{field}={value}"], field,
                roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# Models: the kind a command takes, tokenizers, weights, lengths


@pytest.fixture
def odd_models(env):
    """Checkpoints that are not what a command expects, next to the good one."""
    from transformers import BertModel, GPT2Config, GPT2LMHeadModel

    root = env.root
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40,
                               n_positions=64)).save_pretrained(root / "causal")
    make_tokenizer(root).save_pretrained(root / "causal")
    cfg = tiny_config("bert")
    cfg.architectures = None
    BertModel(cfg).save_pretrained(root / "encoder")
    make_tokenizer(root).save_pretrained(root / "encoder")
    tiny_model("bert").save_pretrained(root / "no-tokenizer")
    m = tiny_model("bert")
    m.save_pretrained(root / "pickled")
    make_tokenizer(root).save_pretrained(root / "pickled")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save(m.state_dict(), root / "pickled" / "pytorch_model.bin")
    m = tiny_model("bert")
    with torch.no_grad():
        m.classifier.weight[0, 0] = float("nan")
    m.save_pretrained(root / "nan-weights")
    make_tokenizer(root).save_pretrained(root / "nan-weights")
    cfg = tiny_config("bert")
    cfg.max_position_embeddings = 512  # the config no longer fits the weights
    cfg.architectures = ["BertForSequenceClassification"]
    tiny_model("bert").save_pretrained(root / "misfit")
    make_tokenizer(root).save_pretrained(root / "misfit")
    cfg.save_pretrained(root / "misfit")
    return root


MODEL_REFUSALS = [
    ("prune", "causal", "decoder"),
    ("finetune", "causal", "decoder"),
    ("compile", "causal", "decoder"),
    ("bench", "causal", "decoder"),
    ("train", "causal", "decoder"),
    ("prune", "encoder", "obert finetune"),
    ("prune", "no-tokenizer", "--tokenizer"),
    ("finetune", "no-tokenizer", "--tokenizer"),
    ("train", "no-tokenizer", "--tokenizer"),
    ("prune", "pickled", "safetensors"),
    ("finetune", "pickled", "safetensors"),
    ("prune", "nan-weights", "non-finite values (NaN or inf) in classifier.weight"),
    ("compile", "nan-weights", "non-finite"),
    ("prune", "misfit", "do not fit its config.json"),
    ("prune", "./does/not/exist", "not found"),
    ("compile", "../nowhere", "not found"),
]


def _with_model(command: str, e: Env, model: str, out: Path) -> list:
    if command == "train":
        return ["train", "--recipe", e.recipe(model={"path": model}, output_dir=str(out))]
    if command == "bench":
        return ["bench", model, *BENCH]
    args = VALID[command](e, out)
    return [args[0], model, *args[2:]]


@pytest.mark.parametrize("command,model,says", MODEL_REFUSALS)
def test_model_kind_and_files_checked(command, model, says, env, odd_models, tmp_path, capsys):
    path = str(odd_models / model) if not model.startswith(".") else model
    refused(capsys, _with_model(command, env, path, tmp_path / "out"), says, roots=[tmp_path])


def test_compiled_model_is_not_a_pruned_model(env, tmp_path, capsys):
    assert run("compile", env.pruned, "--out", tmp_path / "c") == 0
    refused(capsys, ["bench", tmp_path / "c", *BENCH], "compiled obert model", roots=[tmp_path])


def test_tokenizer_option_and_vocabulary_check(env, odd_models, tmp_path, capsys):
    out = tmp_path / "o"
    assert run("prune", odd_models / "no-tokenizer", "--tokenizer", env.model, "--sparsity", 0.5,
               "--method", "magnitude", "--max-length", 16, "--out", out) == 0
    assert (out / "tokenizer.json").is_file()
    big = tmp_path / "big-tok"
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={f"w{i}": i for i in range(100)} | {"[UNK]": 100, "[PAD]": 101}
                      ).save_pretrained(big)
    refused(capsys, ["prune", env.model, "--tokenizer", big, "--sparsity", 0.5, "--method",
                     "magnitude", "--out", tmp_path / "o2"], "embedding holds", roots=[tmp_path])


def test_encoder_gets_a_new_head_in_finetune_and_says_so(env, odd_models, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run(*_with_model("finetune", env, str(odd_models / "encoder"), out)) == 0
    assert "adding one for 3 labels" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]


LENGTHS = [
    (lambda e, o: ["prune", e.model, "--sparsity", 0.5, "--method", "magnitude", "--out", o,
                   "--max-length", 100], "--max-length 100"),
    (lambda e, o: ["finetune", e.model, "--train-file", e.train, "--out", o, "--max-length", 65],
     "--max-length 65"),
    (lambda e, o: ["compile", e.pruned, "--out", o, "--dtype", "int8", "--calibration-file",
                   e.train, "--max-length", 100], "--max-length 100"),
    (lambda e, o: ["bench", e.model, "--seq-len", 65, "--no-onnx"], "--seq-len 65"),
    (lambda e, o: ["train", "--recipe", e.recipe(training={"max_length": 100}, output_dir=str(o))],
     "training.max_length 100"),
]


@pytest.mark.parametrize("case", range(len(LENGTHS)))
def test_lengths_beyond_the_models_positions(case, env, tmp_path, capsys):
    build, says = LENGTHS[case]
    args = build(env, tmp_path / "o")
    refused(capsys, args, [says, "64 positions"], roots=[tmp_path])


def test_default_length_follows_a_short_model(env, tmp_path):
    """Without --max-length, a model with 64 positions gets 64 tokens, not an error."""
    long_rows = [{"text": " ".join(["alpha"] * 200), "label": "math"},
                 {"text": "beta", "label": "net"}, {"text": "gamma", "label": "sound"}] * 8
    data = write_jsonl(tmp_path / "long.jsonl", long_rows)
    assert run("prune", env.model, "--sparsity", 0.3, "--num-grads", 2, "--grad-batch-size", 4,
               "--train-file", data, "--out", tmp_path / "o") == 0


# ---------------------------------------------------------------------------------------------
# Labels: the head keeps its meaning, or the user asks for a new one


def test_label_sets_must_match_an_existing_head(env, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "alpha", "label": "a"},
                                                    {"text": "beta", "label": "b"}] * 8)
    refused(capsys, ["finetune", env.model, "--train-file", other, "--epochs", 1, "--out",
                     tmp_path / "o", "--max-length", 16], ["--reinit-head", "'a'", "'math'"],
            roots=[tmp_path])
    assert run("finetune", env.model, "--train-file", other, "--epochs", 1, "--out",
               tmp_path / "o", "--max-length", 16, "--reinit-head") == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b"}
    single = write_jsonl(tmp_path / "single.jsonl", [{"text": "alpha", "label": "math"}] * 8)
    refused(capsys, ["finetune", env.model, "--train-file", single, "--out", tmp_path / "s"],
            "only one class", roots=[tmp_path])
    refused(capsys, ["train", "--recipe", env.recipe(data={"train_file": other})],
            "model.reinit_head", roots=[tmp_path])


def test_head_kept_for_the_same_labels_and_replaced_on_request(env):
    from obert.tasks.classification import load_classifier

    _, original = load_classifier(str(env.model))
    _, same = load_classifier(str(env.model), ["sound", "math", "net"], log=lambda s: None)
    _, fresh = load_classifier(str(env.model), ["math", "net", "sound"], reinit_head=True,
                               log=lambda s: None)
    assert same.config.label2id == original.config.label2id
    assert torch.equal(same.classifier.weight, original.classifier.weight)
    assert not torch.equal(fresh.classifier.weight, original.classifier.weight)
    assert torch.equal(fresh.bert.encoder.layer[0].output.dense.weight,
                       original.bert.encoder.layer[0].output.dense.weight)


def test_teacher_classes_lined_up_by_name(env, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from obert.tasks.classification import reorder_classes

    teacher = AutoModelForSequenceClassification.from_pretrained(env.model).eval()
    ids = torch.randint(5, 30, (4, 8))
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits  # columns: math, net, sound
        reorder_classes(teacher, {"sound": 0, "math": 1, "net": 2})
        got = teacher(input_ids=ids).logits
    assert torch.equal(got, ref[:, [2, 0, 1]])
    assert teacher.config.id2label == {0: "sound", 1: "math", 2: "net"}
    teacher.save_pretrained(tmp_path / "teacher")
    recipe = env.recipe(distillation={"teacher": str(tmp_path / "teacher")},
                        output_dir=str(tmp_path / "out"))
    assert run("train", "--recipe", recipe, "--no-progress") == 0
    assert "teacher's classes reordered by name" in capsys.readouterr().out
    teacher.config.id2label = {0: "x", 1: "y", 2: "z"}
    teacher.config.label2id = {"x": 0, "y": 1, "z": 2}
    teacher.save_pretrained(tmp_path / "stranger")
    recipe = env.recipe(distillation={"teacher": str(tmp_path / "stranger")},
                        output_dir=str(tmp_path / "out2"))
    refused(capsys, ["train", "--recipe", recipe], ["classifies ['x', 'y', 'z']", "'math'"],
            roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# Data and recipe files


BAD_DATA = [  # (file name, content, what the error must say)
    ("unquoted.csv", "text,label\nalpha, beta,math\ngamma,net\n", ["row 1 has 3 fields", "header has 2"]),
    ("notobj.jsonl", '{"text": "a", "label": "math"}\n1\n', ["line 2 is not a JSON object"]),
    ("truncated.jsonl", '{"text": "a", "label": "math"}\n{"text": "b", "lab\n', ["line 2 is not valid JSON"]),
    ("dupkey.jsonl", '{"text": "a", "label": "math", "label": "net"}\n', ["line 1", "repeats the key 'label'"]),
    ("float.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', ["row 2 has label 0.5"]),
]


@pytest.mark.parametrize("name,content,says", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_malformed_data_named_by_line(name, content, says, env, tmp_path, capsys):
    bad = tmp_path / name
    bad.write_text(content)
    refused(capsys, ["finetune", env.model, "--train-file", bad, "--out", tmp_path / "o"],
            [str(bad), *says], roots=[tmp_path])


BAD_RECIPES = [  # (--set assignments or a raw file, what the error must say)
    (["data.task=sst2"], "not both"),
    (["training.batch_size=true"], "training.batch_size: true/false is not a value"),
    (["training.epochs=abc"], "--set training.epochs"),
    (["=5"], "--set expects section.key=value"),
    ("model:\n  path: m\nmodel:\n  path: n\n", "line 3, column 1: the key 'model' appears twice"),
    ("model:\n\tpath: x\n", "line 2, column 1"),
]


@pytest.mark.parametrize("case", range(len(BAD_RECIPES)))
def test_bad_recipes_named_precisely(case, env, tmp_path, capsys):
    change, says = BAD_RECIPES[case]
    recipe = env.recipe()
    if isinstance(change, str):
        recipe.write_text(change)
        args = ["train", "--recipe", recipe]
    else:
        args = ["train", "--recipe", recipe, *[a for c in change for a in ("--set", c)]]
    refused(capsys, args, says, roots=[tmp_path])


def test_valid_but_unusual_files_are_accepted(env, tmp_path):
    from obert.training.checkpoints import recipe_changes
    from obert.tasks.data import load_file
    from obert.training.recipe import load_recipe

    long_text = " ".join(["alpha"] * 40000)  # over the csv module's default 128 KiB field limit
    csv_file = tmp_path / "long.csv"
    csv_file.write_text(f'text,label\n"{long_text}",math\n"beta, gamma",net\n')
    rows = load_file(csv_file)
    assert rows.texts == [long_text, "beta, gamma"] and rows.labels == ["math", "net"]
    from obert.training.recipe import UniqueKeyLoader

    merged = yaml.load("base: &b {a: 1}\nx:\n  <<: *b\n  c: 2\n", Loader=UniqueKeyLoader)
    assert merged == {"base": {"a": 1}, "x": {"a": 1, "c": 2}}
    a = load_recipe(env.recipe()).model_dump()
    b = {**a, "data": {**a["data"], "train_file": "./" + os.path.relpath(a["data"]["train_file"])}}
    assert recipe_changes(a, b) == []
    assert recipe_changes(a, {**a, "training": {**a["training"], "lr": 0.5}}) == ["training.lr"]


def test_data_and_recipe_files_named_in_errors(env, tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok", "label": "math"}\n{"text": "caf\xe9", "label": "net"}\n')
    refused(capsys, ["prune", env.model, "--sparsity", 0.5, "--train-file", latin, "--out",
                     tmp_path / "o"], [str(latin), "line 2", "UTF-8"], roots=[tmp_path])
    recipe = env.recipe()
    recipe.write_bytes(recipe.read_bytes() + b"# \xff\n")
    refused(capsys, ["train", "--recipe", recipe], [str(recipe), "UTF-8"], roots=[tmp_path])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "alpha", "label": "math"},
                                                {"text": "beta", "label": [1, 2]}])
    refused(capsys, ["finetune", env.model, "--train-file", odd, "--out", tmp_path / "o"],
            ["row 2", "labels are strings or integers"], roots=[tmp_path])
    refused(capsys, ["finetune", env.model, "--train-file", tmp_path, "--out", tmp_path / "o"],
            "is a directory", roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# Resume: checkpoints verified, the newest intact one used, the recipe held to


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A gradual run whose checkpoints were kept: (env, recipe, checkpoint dir)."""
    root = tmp_path_factory.mktemp("resume")
    e = Env(root / "env")
    recipe = e.recipe()
    assert run("train", "--recipe", recipe, "--no-progress", "--keep-checkpoints") == 0
    ckpt = root / "env" / "trained.checkpoints"
    assert len([p for p in ckpt.iterdir() if p.name.startswith("checkpoint-")]) == 2
    return e, recipe, ckpt


@pytest.fixture
def resumable(finished_run, tmp_path):
    """A copy of the finished run without its final output, ready for ``--resume``."""
    import shutil

    e, recipe, ckpt = finished_run
    root = tmp_path / "copy"
    shutil.copytree(e.root, root, symlinks=True)  # the checkpoints lie in it, next to the output
    shutil.rmtree(root / "trained")
    text = recipe.read_text().replace(str(e.root), str(root))
    (root / "recipe.yaml").write_text(text)
    # The checkpoints record the recipe they ran under: point them at the copy too.
    for rec in (root / "trained.checkpoints").glob("checkpoint-*/obert_recipe.yaml"):
        rec.write_text(rec.read_text().replace(str(e.root), str(root)))
    ckpts = sorted((root / "trained.checkpoints").glob("checkpoint-*"),
                   key=lambda p: int(p.name.split("-")[1]))
    return root, ckpts


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("victim", ["model.safetensors", "obert_masks.safetensors",
                                    "trainer_state.json", "optimizer.pt", "obert_recipe.yaml"])
def test_resume_skips_a_damaged_checkpoint(victim, resumable, capsys):
    root, (older, newest) = resumable
    if victim == "obert_recipe.yaml":
        (newest / victim).write_text("model: [unclosed\n")
    else:
        _damage(newest / victim)
    capsys.readouterr()
    assert run("train", "--recipe", root / "recipe.yaml", "--resume", "--no-progress") == 0
    out = capsys.readouterr().out
    assert f"skipped damaged {newest.name}" in out and victim in out
    assert f"resuming from {older.name}" in out
    assert (root / "trained" / "sparsity.json").is_file()


def test_resume_with_every_checkpoint_damaged_is_an_error(resumable, capsys):
    root, ckpts = resumable
    for ck in ckpts:
        _damage(ck / "optimizer.pt")
    refused(capsys, ["train", "--recipe", root / "recipe.yaml", "--resume"],
            ["no intact checkpoint", ckpts[0].name, ckpts[1].name], roots=[root])


def test_resume_refuses_a_changed_recipe_unless_forced(resumable, capsys):
    root, ckpts = resumable
    args = ["train", "--recipe", root / "recipe.yaml", "--resume", "--no-progress",
            "--set", "training.lr=0.5", "--set", "pruning.final_sparsity=0.6"]
    refused(capsys, args, ["training.lr", "pruning.final_sparsity", "--force-recipe"], roots=[root])
    assert run(*args, "--set", "training.device=cpu", "--force-recipe") == 0
    assert "continuing under the new recipe" in capsys.readouterr().out


def test_resume_refuses_to_overwrite_a_finished_output(finished_run, capsys):
    e, recipe, _ = finished_run
    refused(capsys, ["train", "--recipe", recipe, "--resume"], "--overwrite", roots=[e.root])


def test_checkpoint_dir_with_foreign_files_is_refused(env, tmp_path, capsys):
    ckpt = env.root / "trained.checkpoints"
    ckpt.mkdir()
    (ckpt / "thesis.tex").write_text("years of work\n")
    refused(capsys, ["train", "--recipe", env.recipe()], "did not write", roots=[tmp_path])


# ---------------------------------------------------------------------------------------------
# No code from the environment


_PLANT = "open({marker!r}, 'w').write('planted code ran')\nraise ImportError('planted')\n"


def test_bench_child_does_not_import_planted_modules(env, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    plant = tmp_path / "plant"
    plant.mkdir()
    marker = tmp_path / "PLANTED"
    for name in ("onnxruntime.py", "onnx.py"):
        (plant / name).write_text(_PLANT.format(marker=str(marker)))
    # Control: an ordinary child started in that directory does import the plant.
    subprocess.run([sys.executable, "-c", "import onnxruntime"], cwd=plant, capture_output=True)
    assert marker.exists()
    marker.unlink()
    monkeypatch.chdir(plant)
    monkeypatch.setenv("PYTHONPATH", str(plant))
    assert run("bench", env.pruned, "--batch-size", 1, "--seq-len", 8, "--rounds", 1,
               "--iters", 1) == 0
    printed = capsys.readouterr().out
    assert not marker.exists(), "the bench child imported code from the working directory"
    assert "onnxruntime fp32" in printed


@pytest.mark.parametrize("command", ["compile", "bench"])
def test_unknown_kernel_path_in_obert_isa_is_refused(command, env, tmp_path, monkeypatch, capsys):
    from obert import native as kernels

    if not kernels.native_available():
        pytest.skip("no native kernels: OBERT_ISA is not read")
    monkeypatch.setenv("OBERT_ISA", "avx1024")
    args = ["compile", env.pruned, "--out", tmp_path / "c"] if command == "compile" \
        else ["bench", env.model, *BENCH]
    refused(capsys, args, ["OBERT_ISA=avx1024", "this CPU and build run generic"], roots=[tmp_path])
    assert not (tmp_path / "c").exists()
