"""Gradual pruning: schedule, LR rewinding, distillation loss, recipes, the Trainer callback, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import Crashed, crash_at, tiny_recipe, train_with_pruning_callback
from obert.errors import ObertError
from obert.training.schedule import PruningSchedule, cubic_sparsity, lr_factor

ROOT = Path(__file__).resolve().parents[1]


# -- schedule ----------------------------------------------------------------------------------
def test_cubic_schedule_matches_formula():
    s = PruningSchedule(0.7, 0.9, 2, 26, 4)
    epochs = s.epochs()
    assert [e for e, _ in epochs] == [2, 6, 10, 14, 18, 22, 26]  # the paper: 70% then 6 more steps
    for k, (epoch, sp) in enumerate(epochs):
        t = epoch  # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3
        assert sp == pytest.approx(0.9 + (0.7 - 0.9) * (1 - (t - 2) / (6 * 4)) ** 3, abs=1e-12)
    assert epochs[0][1] == pytest.approx(0.7) and epochs[-1][1] == pytest.approx(0.9)
    assert cubic_sparsity(3, 6, 0.7, 0.9) == pytest.approx(0.875)
    assert s.steps(10) == [(20, pytest.approx(0.7)), *[(10 * e, pytest.approx(v)) for e, v in epochs[1:]]]


def test_schedule_rejects_bad_arithmetic():
    with pytest.raises(ObertError, match="frequency"):
        PruningSchedule(0.5, 0.8, 1, 4, 2)
    with pytest.raises(ObertError, match="exceed"):
        PruningSchedule(0.9, 0.8, 1, 3, 1)


def test_lr_rewinds_at_each_pruning_step():
    restarts = [20, 60]
    f = lambda step, mode="rewind": lr_factor(step, 100, restarts, mode, 0.1)  # noqa: E731
    assert f(0) == 1.0 and f(20) == 1.0 and f(60) == 1.0  # restarts
    assert f(10) == pytest.approx(1 - 0.9 * 10 / 20)  # dense phase decays over its own cycle
    assert f(40) == pytest.approx(1 - 0.9 * 20 / 40)
    assert f(100) == pytest.approx(0.1) and f(59) < f(60)
    assert f(50, "linear") == pytest.approx(1 - 0.9 * 0.5) and f(77, "constant") == 1.0


# -- distillation ------------------------------------------------------------------------------
def test_kd_loss_against_hand_computation():
    from transformers.modeling_outputs import SequenceClassifierOutput

    from obert.training.distill import distillation_loss, kd_loss

    torch.manual_seed(0)
    s, t, T = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), 2.5
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [math.exp(x / T) for x in srow]
        zt = [math.exp(x / T) for x in trow]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        expected += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = T * T * expected / 5
    assert float(kd_loss(s, t, T)) == pytest.approx(expected, rel=1e-6)
    task = torch.tensor(0.7)
    mixed = distillation_loss(task, SequenceClassifierOutput(logits=s),
                              SequenceClassifierOutput(logits=t), 0.25, T)
    assert float(mixed) == pytest.approx(0.75 * 0.7 + 0.25 * expected, rel=1e-6)
    assert float(kd_loss(s, s, T)) == pytest.approx(0.0, abs=1e-12)


# -- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"pruning__final_sparsty": 0.9}, "pruning.final_sparsty: unknown field"),
    ({"pruning__final_sparsity": 1.2}, "pruning.final_sparsity"),
    ({"pruning__end_epoch": 9}, "after the last epoch"),
    ({"pruning__frequency": 0.75}, "frequency"),
    ({"training__lr": "fast"}, "training.lr"),
    ({"pruning__method": "random"}, "pruning.method"),
    ({"data": {"train_file": "x.jsonl"}}, "data.task"),
])
def test_recipe_errors_name_the_field(tmp_path, data_files, change, message):
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, "m", **change)
    with pytest.raises(ObertError, match=message.replace(".", r"\.")):
        load_recipe(doc=doc)


def test_recipe_set_overrides(tmp_path, data_files):
    from obert.training.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path, data_files, "m")))
    r = load_recipe(path, ["pruning.final_sparsity=0.9", "training.lr_schedule=linear",
                           "pruning.include=[query, key]", "distillation.temperature=5.5"])
    assert r.pruning.final_sparsity == 0.9 and r.training.lr_schedule == "linear"
    assert r.pruning.include == ["query", "key"] and r.distillation.temperature == 5.5
    with pytest.raises(ObertError, match="section.key=value"):
        load_recipe(path, ["pruning.final_sparsity"])


def test_shipped_recipes_validate():
    from obert.training.recipe import load_recipe, read_recipe_doc
    from obert.training.stages import load_staged

    files = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(files) >= 18
    staged = 0
    for f in files:
        if "stages" in read_recipe_doc(f):
            s = load_staged(f)
            recipes = [s.stage_recipe(i) for i, st in enumerate(s.stages) if st.kind == "training"]
            assert any(r.pruning is not None for r in recipes), f
            staged += 1
        else:
            r = load_recipe(f)
            assert r.pruning is not None and r.distillation is not None, f
    assert staged >= 4


# -- training with the callback ----------------------------------------------------------------
@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir


def _masks_of(out: Path) -> dict:
    from safetensors.torch import load_file

    w = load_file(str(out / "model.safetensors"))
    return {k: (v == 0) for k, v in w.items() if "encoder.layer" in k and k.endswith("weight")
            and v.dim() == 2}


def test_gradual_run_end_to_end(tmp_path, data_files, model_dir):
    from transformers import AutoModelForSequenceClassification

    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    r = load_recipe(doc=tiny_recipe(tmp_path, data_files, model_dir))
    metrics = run_recipe(r, progress=False)
    out = Path(r.output_dir)
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert [round(s["target_sparsity"], 4) for s in sparsity["steps"]] == [0.5, 0.7625, 0.8]
    assert [s["step"] for s in sparsity["steps"]] == [6, 12, 18]  # 96 rows / 16 = 6 steps per epoch
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"accuracy", "global_sparsity"} and saved["accuracy"] == metrics["accuracy"]
    for name in ("history.json", "recipe.yaml", "training.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not Path(str(out) + ".checkpoints").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    zeros = sum(int((t.module.weight == 0).sum()) for t in __import__("obert").find_targets(model))
    total = sum(t.numel for t in __import__("obert").find_targets(model))
    assert zeros / total == pytest.approx(sparsity["global_sparsity"], abs=1e-6)
    history = json.loads((out / "history.json").read_text())
    assert len(history["eval"]) == 4 and history["eval"][-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    # LR rewinding in the Trainer: the LR logged at step s drove optimizer step s (index s - 1);
    # cycles restart at the pruning steps 6, 12 and 18 (lr 1e-3 decaying to 1e-4 in each).
    lr = {e["step"]: e["learning_rate"] for e in history["log"] if "learning_rate" in e}
    assert lr[6] == pytest.approx(1e-3 * (1 - 0.9 * 5 / 6))
    assert lr[8] == pytest.approx(1e-3 * (1 - 0.9 * 1 / 6))  # rewound after the step at 6
    assert lr[14] == pytest.approx(1e-3 * (1 - 0.9 * 1 / 6)) and lr[20] == pytest.approx(1e-3 * (1 - 0.9 * 1 / 6))


def test_resume_reaches_the_same_masks_and_metrics(tmp_path, data_files, model_dir):
    from obert.training.gradual import checkpoint_dir, run_recipe
    from obert.training.recipe import load_recipe

    full = load_recipe(doc=tiny_recipe(tmp_path, data_files, model_dir,
                                       output_dir=str(tmp_path / "full")))
    run_recipe(full, progress=False)
    cut = load_recipe(doc=tiny_recipe(tmp_path, data_files, model_dir,
                                      output_dir=str(tmp_path / "cut")))
    with pytest.raises(Crashed):  # killed in epoch 3, after the 2nd pruning step and a checkpoint
        run_recipe(cut, progress=False, extra_callbacks=[crash_at(15)])
    assert not Path(cut.output_dir).exists()  # nothing half-written
    assert (checkpoint_dir(cut) / "checkpoint-12" / "obert_complete").is_file()
    with pytest.raises(ObertError, match="--resume"):
        run_recipe(cut, progress=False)
    run_recipe(cut, resume=True, progress=False)
    a, b = _masks_of(Path(full.output_dir)), _masks_of(Path(cut.output_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((Path(full.output_dir) / "metrics.json").read_text())
    mb = json.loads((Path(cut.output_dir) / "metrics.json").read_text())
    assert ma["accuracy"] == mb["accuracy"] and ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)


def test_callback_in_a_plain_trainer_keeps_pruned_weights_zero(tmp_path, data_files, model_dir):
    """The callback added to a user's own ``transformers.Trainer`` (AdamW, weight decay): after
    every optimizer step pruned weights are exactly 0 and their Adam moments are 0."""
    from obert import PruneConfig

    def step_check(pruning, optimizer):
        for t in pruning.masks.targets:
            pruned = ~pruning.masks.masks[t.name]
            assert bool((t.module.weight[pruned] == 0).all())
            for key in ("exp_avg", "exp_avg_sq"):
                assert bool((optimizer.state[t.module.weight][key][pruned] == 0).all())

    pruning, checked = train_with_pruning_callback(
        tmp_path, data_files, model_dir, PruneConfig(0.6, num_grads=8, grad_batch_size=8, fisher_block_size=16),
        step_check, use_cpu=True)
    assert len(checked) == 18 and checked[0] == pytest.approx(0.3, abs=1e-3)
    assert checked[-1] == pytest.approx(0.6, abs=1e-3)
    assert [h["step"] for h in pruning.history] == [0, 6, 12]
