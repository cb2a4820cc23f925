"""Staged recipes: upstream prune -> drop layers -> sparse transfer -> compile on a tiny random
model, resumed after a kill between stages; every stage checked before the first runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import make_rows, make_tokenizer, tiny_config

from obert.cli.main import main


@pytest.fixture
def staged(tmp_path, data_files):
    from transformers import BertForMaskedLM

    mlm = tmp_path / "mlm"
    config = tiny_config("bert")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(mlm)
    make_tokenizer(tmp_path).save_pretrained(mlm)
    corpus, held = tmp_path / "corpus.txt", tmp_path / "held.txt"
    corpus.write_text("\n".join(r["text"] for r in make_rows(120, 5)) + "\n")
    held.write_text("\n".join(r["text"] for r in make_rows(30, 6)) + "\n")
    doc = {"output_dir": str(tmp_path / "run"), "stages": [
        {"name": "upstream", "model": {"path": str(mlm), "task_type": "masked-lm"},
         "data": {"train_file": str(corpus), "eval_file": str(held)},
         "training": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32, "seed": 0},
         "pruning": {"init_sparsity": 0.5, "final_sparsity": 0.8, "start_epoch": 0, "end_epoch": 1,
                     "frequency": 1, "num_grads": 8, "grad_batch_size": 4, "fisher_block_size": 16},
         "distillation": {"teacher": str(mlm), "hardness": 1.0, "temperature": 2.0}},
        {"name": "drop", "drop_layers": {"num_layers": 2}},
        {"name": "transfer", "model": {"task_type": "classification"},
         "data": {"train_file": data_files[0], "eval_file": data_files[1]},
         "training": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 16, "seed": 0}},
        {"name": "compile", "compile": {"dtype": "float32", "choose": "sparsity"}},
    ]}
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, doc, tmp_path / "run"


def test_staged_recipe_runs_and_resumes_after_a_kill(staged, monkeypatch, capsys):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from obert import find_targets
    from obert.runtime import load_compiled

    path, _, run = staged

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("obert.training.layers.drop_layers_dir", killed)
    assert main(["train", "--recipe", str(path), "--no-progress"]) == 130  # killed in stage 2
    upstream = run / "01-upstream"
    assert json.loads((upstream / "stage.json").read_text())["stage"] == "upstream"
    assert not (run / "02-drop").exists()
    first = (upstream / "model.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--recipe", str(path), "--no-progress"]) == 2  # no --resume: refused
    assert "stage 'upstream': " in capsys.readouterr().err
    assert main(["train", "--recipe", str(path), "--no-progress", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "stage 1/4 'upstream': finished in" in out and "skipped" in out
    assert (upstream / "model.safetensors").stat().st_mtime_ns == first  # not run again

    # Upstream: 80% sparse masked LM; drop: its layers 0 and 3; transfer: the same zeros.
    up = AutoModelForMaskedLM.from_pretrained(upstream)
    up_zero = {t.name: t.module.weight == 0 for t in find_targets(up)}
    assert json.loads((upstream / "sparsity.json").read_text())["global_sparsity"] == \
        pytest.approx(0.8, abs=1e-3)
    assert json.loads((run / "02-drop" / "layers.json").read_text())["kept_layers"] == [0, 3]
    clf = AutoModelForSequenceClassification.from_pretrained(run / "03-transfer")
    for t in find_targets(clf):
        new, old = t.name.removeprefix("bert.encoder.layer."), None
        index, _, rest = new.partition(".")
        old = f"bert.encoder.layer.{[0, 3][int(index)]}.{rest}"
        assert torch.equal(t.module.weight == 0, up_zero[old]), t.name
    compiled = load_compiled(run / "04-compile")
    ids = torch.randint(5, clf.config.vocab_size, (2, 9))
    torch.testing.assert_close(compiled(input_ids=ids).logits, clf.eval()(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)
    for folder in ("01-upstream", "02-drop", "03-transfer", "04-compile"):
        assert (run / folder / "README.md").is_file() and (run / folder / "stage.json").is_file()
    # Everything finished: a resume skips it all.
    assert main(["train", "--recipe", str(path), "--no-progress", "--resume"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4


def _refused(path, doc, capsys, *extra) -> str:
    path.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_staged_recipes_are_checked_before_anything_runs(staged, capsys):
    path, doc, run = staged
    bad = copy.deepcopy(doc)
    bad["stages"][2]["training"]["lr"] = -1
    assert "stages.transfer.training.lr: Input should be greater than 0 (got -1)" in \
        _refused(path, bad, capsys)
    bad = copy.deepcopy(doc)
    bad["stages"][1]["drop_layers"] = {"keep": [0], "num_layers": 1}
    assert "give keep or num_layers" in _refused(path, bad, capsys)
    bad = copy.deepcopy(doc)
    bad["stages"] = [doc["stages"][0], doc["stages"][3], doc["stages"][1]]
    assert "stage 'compile' compiles: only the last stage can" in _refused(path, bad, capsys)
    bad = copy.deepcopy(doc)
    bad["stages"][1]["name"] = "upstream"
    assert "stage names must differ" in _refused(path, bad, capsys)
    bad = copy.deepcopy(doc)
    del bad["stages"][2]["data"]
    assert "a training stage needs data and training sections" in _refused(path, bad, capsys)
    assert "--set stages.transfer.training.lr: " in _refused(
        path, doc, capsys, "--set", "stages.transfer.training.lr=0")
    assert "no stage named 'nope'" in _refused(path, doc, capsys, "--set", "stages.nope.training.lr=1")
    assert not run.exists()  # nothing ran


def test_a_stage_run_again_runs_every_later_stage_again(tmp_path, capsys):
    """--resume skips a finished stage only while nothing before it ran again (its input would
    be stale otherwise)."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("bert")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    src = tmp_path / "src"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(src)
    make_tokenizer(tmp_path).save_pretrained(src)
    doc = {"output_dir": str(tmp_path / "run"), "stages": [
        {"name": "a", "model": {"path": str(src)}, "drop_layers": {"keep": [0, 1]}},
        {"name": "b", "drop_layers": {"keep": [0]}}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(path)]) == 0
    change = ["--set", "stages.a.drop_layers.keep=[1, 2]"]
    assert main(["train", "--recipe", str(path), "--resume", *change]) == 2
    assert "other settings: pass --overwrite to run it again" in capsys.readouterr().err
    assert main(["train", "--recipe", str(path), "--resume", "--overwrite", *change]) == 0
    out = capsys.readouterr().out
    assert "'b': drop layers" in out and "skipped" not in out  # b ran again on a's new output
    original = AutoModelForSequenceClassification.from_pretrained(src)
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "02-b")
    assert torch.equal(final.bert.encoder.layer[0].output.dense.weight,
                       original.bert.encoder.layer[1].output.dense.weight)


def test_drop_stages_name_layers_the_model_will_have(staged, capsys):
    path, doc, run = staged
    bad = copy.deepcopy(doc)
    bad["stages"][1]["drop_layers"] = {"num_layers": 5}  # the starting model has 4
    assert "stages.drop.drop_layers.num_layers: must be between 1 and the model's 4 layers, got 5" \
        in _refused(path, bad, capsys)
    bad["stages"][1]["drop_layers"] = {"keep": [0, 4]}
    assert "stages.drop.drop_layers.keep: layer 4: the model has layers 0 to 3" in \
        _refused(path, bad, capsys)
    bad["stages"].insert(2, {"name": "again", "drop_layers": {"keep": [2]}})  # after keep [0, 3]: 2 left
    bad["stages"][1]["drop_layers"] = {"keep": [0, 3]}
    assert "stages.again.drop_layers.keep: layer 2: the model has layers 0 to 1" in \
        _refused(path, bad, capsys)
    assert not run.exists()
