"""Sparse transfer: training from a pruned model keeps its zeros (the mask is locked) unless
``training.lock_mask: false``; gradual pruning from a pruned model never regrows its zeros."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_recipe
from transformers import AutoModelForSequenceClassification, TrainerCallback

from obert import find_targets
from obert.cli.main import main


def _weights(path) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(path)
    return {t.name: t.module.weight.detach().clone() for t in find_targets(model)}


@pytest.fixture
def pruned_dir(tmp_path, tiny_model_dir):
    out = tmp_path / "pruned"
    assert main(["prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                 "--scope", "uniform", "--out", str(out)]) == 0
    return out


class AdamStateCheck(TrainerCallback):
    """At the end of training: Adam's moments of every target weight, by target name."""

    def __init__(self):
        self.moments: dict[str, list[torch.Tensor]] = {}

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        for t in find_targets(model):
            st = optimizer.state.get(t.module.weight, {})
            self.moments[t.name] = [v.detach().clone() for k, v in st.items()
                                    if k in ("exp_avg", "exp_avg_sq")]


def _run(tmp_path, data_files, model_dir, teacher, extra=None, **over):
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, str(model_dir), pruning=None,
                      distillation={"teacher": str(teacher), "hardness": 0.5, "temperature": 2.0},
                      training__epochs=2, **over)
    run_recipe(load_recipe(doc=doc), progress=False, extra_callbacks=extra or [])
    return tmp_path / "out"


def test_transfer_keeps_the_mask_exactly(tmp_path, data_files, tiny_model_dir, pruned_dir, capsys):
    before = _weights(pruned_dir)
    check = AdamStateCheck()
    out = _run(tmp_path, data_files, pruned_dir, tiny_model_dir, extra=[check])
    assert "is 50.0% sparse: its zeros stay zero" in capsys.readouterr().out
    after = _weights(out)
    for name, w in before.items():
        assert torch.equal(after[name] != 0, w != 0), name  # the same zeros, no more, no fewer
        assert not torch.equal(after[name], w), name  # and the kept weights did train
        pruned = w == 0
        assert len(check.moments[name]) == 2
        for moment in check.moments[name]:  # Adam holds nothing that could push them back
            assert bool((moment[pruned] == 0).all()), name
    record = json.loads((out / "sparsity.json").read_text())
    source = json.loads((pruned_dir / "sparsity.json").read_text())
    assert record["layers"] == source["layers"]  # per-layer sparsity equal, exactly
    assert record["global_sparsity"] == source["global_sparsity"]
    assert record["method"] == "magnitude" and record["mask_locked_from"] == str(pruned_dir)


def test_transfer_without_the_lock_refills_the_zeros(tmp_path, data_files, tiny_model_dir,
                                                     pruned_dir):
    out = _run(tmp_path, data_files, pruned_dir, tiny_model_dir, training__lock_mask=False)
    after = _weights(out)
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros < 0.01 * sum(w.numel() for w in after.values())
    assert json.loads((out / "sparsity.json").read_text())["method"] == "dense"


def test_gradual_pruning_from_a_pruned_model_keeps_its_zeros(tmp_path, data_files, tiny_model_dir,
                                                            pruned_dir):
    before = _weights(pruned_dir)
    doc = tiny_recipe(tmp_path, data_files, str(pruned_dir), pruning__init_sparsity=0.6,
                      distillation={"teacher": tiny_model_dir, "hardness": 0.5, "temperature": 2.0})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(recipe), "--no-progress"]) == 0
    after = _weights(tmp_path / "out")
    for name, w in before.items():
        assert bool((after[name][w == 0] == 0).all()), name  # pruned before: still pruned
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["global_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_finetune_of_a_pruned_model_keeps_its_zeros(tmp_path, data_files, pruned_dir, capsys):
    before = _weights(pruned_dir)
    for lock, out in ((True, tmp_path / "ft"), (False, tmp_path / "ft-free")):
        assert main(["finetune", str(pruned_dir), "--train-file", data_files[0], "--epochs", "1",
                     "--max-length", "16", "--lr", "1e-3", "--out", str(out),
                     *([] if lock else ["--no-lock-mask"])]) == 0
        after = _weights(out)
        if lock:
            assert "is 50.0% sparse: its zeros stay zero" in capsys.readouterr().out
            for name, w in before.items():
                assert torch.equal(after[name] != 0, w != 0), name
            record = json.loads((out / "sparsity.json").read_text())
            assert record["layers"] == json.loads((pruned_dir / "sparsity.json").read_text())["layers"]
        else:
            assert sum(int((w == 0).sum()) for w in after.values()) == 0
            assert not (out / "sparsity.json").exists()


def test_block4_pruning_from_an_unstructured_mask_is_refused(tmp_path, data_files, tiny_model_dir,
                                                             pruned_dir):
    from obert.errors import ObertError
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, str(pruned_dir), pruning__structure="block4",
                      pruning__init_sparsity=0.6, pruning__fisher_block_size=16,
                      distillation={"teacher": tiny_model_dir, "hardness": 0.5, "temperature": 2.0})
    with pytest.raises(ObertError, match="has zeros that are not whole blocks of 4"):
        run_recipe(load_recipe(doc=doc), progress=False)
    assert not (tmp_path / "out").exists()
