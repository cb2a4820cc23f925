"""The obert CLI end to end on a tiny random BERT, and every bad input it must refuse cleanly."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import block4_pruned_dir, write_jsonl

from obert.cli.main import main


def run_cli(*args):
    return main([str(a) for a in args])


def _accuracy(model_dir, eval_file, max_length: int) -> float:
    """Accuracy of the saved classifier on a JSONL file, recomputed here (one row at a time)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(eval_file)]
    right = 0
    with torch.no_grad():
        for row in rows:
            enc = tok(row["text"], truncation=True, max_length=max_length, return_tensors="pt")
            right += int(model(**enc).logits.argmax(-1)) == model.config.label2id[row["label"]]
    return right / len(rows)


def test_finetune_then_prune_end_to_end(tmp_path, data_files, tiny_model_dir, capsys):
    train, evalf = data_files
    ft = tmp_path / "ft"
    assert run_cli("finetune", tiny_model_dir, "--train-file", train, "--eval-file", evalf,
                   "--out", ft, "--epochs", 1, "--batch-size", 16, "--max-length", 16,
                   "--lr", 1e-3) == 0
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(_accuracy(ft, evalf, 16), abs=1.5 / 48)
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["label2id"] == {"math": 0, "net": 1, "sound": 2}  # sorted label order

    for structure, sparsity in (("unstructured", 0.7), ("block4", 0.5)):
        out = tmp_path / f"pruned-{structure}"
        assert run_cli("prune", ft, "--train-file", train, "--eval-file", evalf, "--out", out,
                       "--sparsity", sparsity, "--structure", structure, "--num-grads", 8,
                       "--grad-batch-size", 8, "--damp", 1e-6, "--max-length", 16,
                       "--num-recomputations", 2) == 0
        assert "accuracy before" in capsys.readouterr().out
        record = json.loads((out / "sparsity.json").read_text())
        assert record["method"] == "obert" and record["structure"] == structure
        assert abs(record["global_sparsity"] - sparsity) <= 4 / record["num_params"]
        assert set(json.loads((out / "metrics.json").read_text())) >= {"accuracy_before", "accuracy_after"}

        # Reloads as an ordinary Hugging Face model with the zeros in place.
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(out)
        from obert import find_targets

        targets = find_targets(model)
        zeros = sum(int((t.module.weight == 0).sum()) for t in targets)
        assert zeros == record["num_pruned"]
        for t in targets:
            assert record["layers"][t.name]["sparsity"] == pytest.approx(
                float((t.module.weight == 0).float().mean()))
        assert (out / "model.safetensors").exists()

        # Masks rebuilt from the zeros survive a training step (AdamW with weight decay).
        from obert import MaskSet

        masks = MaskSet.from_zeros(targets)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        masks.attach(opt)
        batch = {"input_ids": torch.randint(5, 30, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
        for _ in range(2):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        assert sum(int((t.module.weight == 0).sum()) for t in targets) == record["num_pruned"]


def test_magnitude_needs_no_training_data(tmp_path, tiny_model_dir):
    out = tmp_path / "mag"
    assert run_cli("prune", tiny_model_dir, "--sparsity", 0.4, "--method", "magnitude",
                   "--scope", "uniform", "--out", out) == 0
    record = json.loads((out / "sparsity.json").read_text())
    for layer in record["layers"].values():
        assert layer["sparsity"] == pytest.approx(0.4, abs=1 / layer["numel"])


@pytest.mark.parametrize("case", ["missing-file", "sparsity-high", "sparsity-negative",
                                  "unknown-method", "unknown-structure", "no-prunable",
                                  "no-labels", "unknown-label", "bad-json", "no-model",
                                  "no-train-data", "bad-option"])
def test_bad_input_one_line_error_and_nothing_written(case, tmp_path, data_files, tiny_model_dir, capsys):
    train, evalf = data_files
    out = tmp_path / "out"
    base = ["prune", tiny_model_dir, "--train-file", train, "--out", out, "--sparsity", 0.5,
            "--num-grads", 4, "--grad-batch-size", 8]
    args = {
        "missing-file": ["prune", tiny_model_dir, "--train-file", tmp_path / "nope.jsonl", "--out", out,
                         "--sparsity", 0.5],
        "sparsity-high": base[:-4] + ["--sparsity", 1.0],
        "sparsity-negative": base + ["--sparsity", -0.2],
        "unknown-method": base + ["--method", "random"],
        "unknown-structure": base + ["--structure", "3:5"],
        "no-prunable": base + ["--include", "does-not-exist"],
        "no-labels": ["prune", tiny_model_dir, "--train-file",
                      write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "alpha beta"}] * 4),
                      "--out", out, "--sparsity", 0.5],
        "unknown-label": ["prune", tiny_model_dir, "--train-file",
                          write_jsonl(tmp_path / "odd.jsonl", [{"text": "alpha", "label": "games"}] * 4),
                          "--out", out, "--sparsity", 0.5],
        "bad-json": ["prune", tiny_model_dir, "--train-file", tmp_path / "bad.jsonl", "--out", out,
                     "--sparsity", 0.5],
        "no-model": ["prune", tmp_path / "no-such-model", "--train-file", train, "--out", out,
                     "--sparsity", 0.5],
        "no-train-data": ["prune", tiny_model_dir, "--out", out, "--sparsity", 0.5],
        "bad-option": base + ["--frobnicate", 3],
    }[case]
    (tmp_path / "bad.jsonl").write_text('{"text": "alpha", "label": "math"}\n{not json\n')
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_failure_mid_run_leaves_existing_output_untouched(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    assert run_cli("prune", tiny_model_dir, "--sparsity", 0.3, "--method", "magnitude", "--out", out) == 0
    before = (out / "sparsity.json").read_text()

    def explode(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("obert.io.write_json", explode)
    assert run_cli("prune", tiny_model_dir, "--sparsity", 0.6, "--method", "magnitude", "--out", out) != 0
    assert (out / "sparsity.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_console_script_exit_code(tmp_path):
    """The installed entry point returns non-zero with one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "obert.cli", "prune", str(tmp_path / "x"),
                           "--sparsity", "2", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "sparsity must be in [0, 1)" in proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "obert.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("finetune", "prune", "train", "drop-layers", "compile", "export", "bench"):
        assert command in proc.stdout


def _recipe_file(tmp_path, data_files, model_dir, **changes):
    import yaml

    doc = {"model": {"path": model_dir},
           "data": {"train_file": data_files[0], "eval_file": data_files[1]},
           "training": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 16, "seed": 0},
           "pruning": {"method": "magnitude", "init_sparsity": 0.3, "final_sparsity": 0.5,
                       "start_epoch": 0, "end_epoch": 1, "frequency": 1},
           "output_dir": str(tmp_path / "out")}
    for key, value in changes.items():
        section, field = key.split("__")
        doc[section][field] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_train_command_end_to_end(tmp_path, data_files, tiny_model_dir, capsys):
    recipe = _recipe_file(tmp_path, data_files, tiny_model_dir)
    assert run_cli("train", "--recipe", recipe, "--set", "pruning.final_sparsity=0.6",
                   "--no-progress") == 0
    assert "sparsity 0.6" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["method"] == "magnitude" and record["global_sparsity"] == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("case", ["missing-recipe", "bad-yaml", "unknown-field", "bad-set",
                                  "no-model", "end-after-training", "checkpoints-exist",
                                  "teacher-labels"])
def test_train_bad_input_one_line_error(case, tmp_path, data_files, tiny_model_dir, capsys):
    args = ["train", "--recipe", _recipe_file(tmp_path, data_files, tiny_model_dir)]
    if case == "missing-recipe":
        args = ["train", "--recipe", tmp_path / "none.yaml"]
    elif case == "bad-yaml":
        (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
        args = ["train", "--recipe", tmp_path / "bad.yaml"]
    elif case == "unknown-field":
        args += ["--set", "training.epochz=3"]
    elif case == "bad-set":
        args += ["--set", "training"]
    elif case == "no-model":
        args += ["--set", f"model.path={tmp_path / 'nothing'}"]
    elif case == "end-after-training":
        args += ["--set", "pruning.end_epoch=5", "--set", "pruning.frequency=5"]
    elif case == "teacher-labels":
        from conftest import tiny_config
        from transformers import AutoModelForSequenceClassification

        cfg = tiny_config("bert")
        cfg.id2label, cfg.label2id = {0: "a", 1: "b"}, {"a": 0, "b": 1}
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "teacher2")
        args += ["--set", f"distillation={{teacher: {tmp_path / 'teacher2'}}}"]
    elif case == "checkpoints-exist":
        ck = tmp_path / "out.checkpoints" / "checkpoint-3"
        ck.mkdir(parents=True)
        (ck / "obert_complete").write_text("ok\n")
    capsys.readouterr()  # only what the command prints counts
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _block4_pruned_dir(tmp_path, tiny_model_dir):
    return block4_pruned_dir(tiny_model_dir, tmp_path / "pruned")


def test_compile_command_int8_with_calibration_saves_a_loadable_model(tmp_path, data_files,
                                                                      tiny_model_dir, capsys):
    from obert.runtime import load_compiled
    pruned, model = _block4_pruned_dir(tmp_path, tiny_model_dir)
    out = tmp_path / "compiled"
    assert run_cli("compile", pruned, "--out", out, "--dtype", "int8", "--calibration-file",
                   data_files[0], "--calibration-rows", 40, "--max-length", 24,
                   "--choose", "sparsity") == 0
    printed = capsys.readouterr().out
    assert "12 of 12 Linear layers run sparse" in printed and "OBS rounding" in printed
    loaded = load_compiled(out)
    assert loaded.bert.encoder.layer[0].attention.self.key.quantized
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    ids = torch.randint(5, 30, (3, 10))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())


@pytest.mark.parametrize("case", ["dtype", "calibration without int8", "missing file", "no model",
                                  "min sparsity", "nothing sparse"])
def test_compile_command_bad_input(case, tmp_path, data_files, tiny_model_dir, capsys):
    pruned, _ = _block4_pruned_dir(tmp_path, tiny_model_dir)
    capsys.readouterr()
    out = tmp_path / "compiled"
    args = {"dtype": [pruned, "--dtype", "int4"],
            "calibration without int8": [pruned, "--calibration-file", data_files[0]],
            "missing file": [pruned, "--dtype", "int8", "--calibration-file", tmp_path / "none.jsonl"],
            "no model": [tmp_path / "nothing"],
            "min sparsity": [pruned, "--min-sparsity", "1.5"],
            "nothing sparse": [tiny_model_dir]}[case]
    assert run_cli("compile", *args, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
