"""A new pruning method is one class and one registration: a toy method defined here, and only
here, with a setting of its own, runs through `obert prune` and through a recipe (`obert train`),
its setting and lifecycle hooks included."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
import yaml
from conftest import tiny_recipe

from pydantic import Field, field_validator

from obert.cli.main import main
from obert.pruning.methods import METHODS, Method
from obert.pruning.settings import Settings


class LargestFirstSettings(Settings):
    order: str = Field("largest", description="largest: prune the largest weights first; "
                                              "smallest: the smallest (as magnitude)")

    @field_validator("order")
    @classmethod
    def _known(cls, value):
        if value not in ("largest", "smallest"):
            raise ValueError(f"must be largest or smallest, got '{value}'")
        return value


def signed_magnitudes(method: Method, targets, sign: float) -> dict:
    """``sign`` times each group's L1 norm (lower = pruned first)."""
    g = method.config.group_size
    return {t.name: sign * t.module.weight.detach().float().abs().reshape(-1, g).sum(1)
            for t in targets}


class Zeroing(Method):
    """The update of a method without curvature: pruned weights become 0."""

    @torch.no_grad()
    def update(self, targets, prune):
        for t in targets:
            t.module.weight.masked_fill_(prune[t.name], 0.0)


class LargestFirst(Zeroing):
    """Prunes the largest weights first (the opposite of magnitude): easy to recognise in a mask;
    its own setting ``order`` turns it around."""

    Settings = LargestFirstSettings
    calls: list[str] = []

    def on_train_begin(self, model, targets, masks):
        self.calls.append("begin")

    def on_optimizer_step(self, model, targets, masks):
        self.calls.append("step")

    def on_train_end(self, model, targets, masks):
        self.calls.append("end")

    def scores(self, model, targets, masks, loader_factory, step):
        self.calls.append("scores")
        return signed_magnitudes(self, targets, -1.0 if self.options.order == "largest" else 1.0)


@pytest.fixture
def largest_first(monkeypatch):
    monkeypatch.setitem(METHODS, "largest-first", LargestFirst)
    LargestFirst.calls = []
    return LargestFirst


def _kept_are_the_smallest(model_dir, original_dir, smallest: bool = True) -> None:
    """Per layer, every kept weight is no larger in magnitude than any pruned one (``smallest``;
    else no smaller)."""
    from transformers import AutoModelForSequenceClassification

    from obert import find_targets

    pruned = AutoModelForSequenceClassification.from_pretrained(model_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(original_dir)
    for t, d in zip(find_targets(pruned), find_targets(dense)):
        kept = t.module.weight != 0
        w = d.module.weight.detach().abs()
        if bool(kept.any()) and bool((~kept).any()):
            if smallest:
                assert float(w[kept].max()) <= float(w[~kept].min()), t.name
            else:
                assert float(w[kept].min()) >= float(w[~kept].max()), t.name


def test_a_registered_method_runs_through_obert_prune(largest_first, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main(["prune", tiny_model_dir, "--method", "largest-first", "--sparsity", "0.5",
                 "--scope", "uniform", "--max-length", "16", "--out", str(out)]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "largest-first" and record["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert largest_first.calls == ["scores"]  # one-shot: no training hooks
    assert record["settings"]["order"] == "largest"  # the method's default, recorded
    _kept_are_the_smallest(out, tiny_model_dir)
    # Its own setting is an option of `obert prune`, with its help, and reaches the method.
    out = tmp_path / "out2"
    assert main(["prune", tiny_model_dir, "--method", "largest-first", "--order", "smallest",
                 "--sparsity", "0.5", "--scope", "uniform", "--max-length", "16", "--out", str(out)]) == 0
    assert json.loads((out / "sparsity.json").read_text())["settings"]["order"] == "smallest"
    _kept_are_the_smallest(out, tiny_model_dir, smallest=False)


def test_a_registered_methods_setting_is_checked_and_documented(largest_first, tmp_path,
                                                                tiny_model_dir, capsys):
    base = ["prune", tiny_model_dir, "--sparsity", "0.5", "--out", str(tmp_path / "o")]
    assert main(base + ["--method", "largest-first", "--order", "middle"]) == 2
    assert capsys.readouterr().err.strip() == "error: --order must be largest or smallest, got 'middle'"
    # Another method's settings are refused by name, not silently ignored.
    assert main(base + ["--method", "largest-first", "--damp", "1e-3"]) == 2
    assert "--damp is a setting of obert, woodfisher or mfac, not of largest-first" in capsys.readouterr().err
    assert main(base + ["--order", "largest"]) == 2
    assert "--order is a setting of largest-first, not of obert" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["prune", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help, unboxed
    assert "--order <str> largest-first: largest: prune the largest weights first" in shown


def test_a_registered_method_runs_through_a_recipe(largest_first, tmp_path, data_files,
                                                    tiny_model_dir, capsys):
    model_dir = tiny_model_dir
    doc = tiny_recipe(tmp_path, data_files, model_dir, pruning__method="largest-first",
                      pruning__order="smallest",  # its own setting, in the recipe
                      training__lr=1e-12, training__weight_decay=0.0)  # weights as loaded
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(recipe), "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["method"] == "largest-first"
    assert record["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    calls = largest_first.calls
    assert calls[0] == "begin" and calls[-1] == "end" and calls.count("scores") == 3
    assert calls.count("step") >= 8  # after every optimizer step
    _kept_are_the_smallest(tmp_path / "out", model_dir, smallest=False)
    # A bad value of the method's own setting names the recipe field.
    doc["pruning"]["order"] = "middle"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(recipe), "--overwrite"]) == 2
    assert "pruning.order: must be largest or smallest, got 'middle'" in capsys.readouterr().err


def test_an_unregistered_method_is_refused_by_the_cli_and_recipes(tmp_path, tiny_model_dir, data_files,
                                                                    capsys):
    assert main(["prune", tiny_model_dir, "--method", "largest-first", "--sparsity", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--method must be obert, magnitude, woodfisher, mfac, movement or soft-movement, got 'largest-first'" in capsys.readouterr().err
    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__method="largest-first")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(recipe)]) == 2
    assert "pruning.method: must be obert, magnitude, woodfisher, mfac, movement or soft-movement, got 'largest-first'" in capsys.readouterr().err


def test_pruning_settings_are_defined_once(largest_first):
    """The `obert prune` options and the recipe's pruning fields are generated from / inherit
    PruneSettings and each registered method's Settings: same names, defaults and help;
    PruneConfig adds sparsity and seed."""
    import inspect

    from obert.cli.main import attach_settings, prune
    from obert.pruning.settings import PruneConfig, PruneSettings, option_name
    from obert.training.recipe import PruningSection

    attach_settings(prune)  # as main() does: the options of the methods registered now
    options = {name: p.default for name, p in inspect.signature(prune).parameters.items()}
    for name, field in PruneConfig.model_fields.items():
        opt = options[name]
        assert option_name(name) in opt.param_decls and opt.help == field.description
        assert opt.default == (... if field.is_required() else field.default)
    assert METHODS["obert"].Settings.model_fields and LargestFirst.Settings.model_fields
    for method, cls in METHODS.items():
        for name, field in cls.Settings.model_fields.items():
            opt = options[name]
            assert option_name(name) in opt.param_decls and opt.default is None  # = the method's
            owners = [m for m, c in METHODS.items() if name in c.Settings.model_fields]
            assert opt.help.startswith("/".join(owners) + ": ")  # one option for all its owners
            assert method in owners and name not in PruneSettings.model_fields
            if owners == [method]:
                assert opt.help.startswith(f"{method}: {field.description}")
    # A shared setting whose default differs per method names each default.
    assert options["update"].help.endswith("default joint (obert), independent (woodfisher), joint (mfac)")
    for name, field in PruneSettings.model_fields.items():
        assert PruningSection.model_fields[name].default == field.default
        assert PruningSection.model_fields[name].description == field.description
    assert set(PruneConfig.model_fields) - set(PruneSettings.model_fields) == {"sparsity", "seed"}
    # The recipe takes a method's settings with the method's defaults.
    section = dict(init_sparsity=0.5, final_sparsity=0.8, start_epoch=0, end_epoch=1)
    assert PruningSection(**section).options.num_grads == METHODS["obert"].Settings().num_grads
    assert PruningSection(**section, method="largest-first").options.order == "largest"


class SwitchSettings(Settings):
    side: Literal["low", "high"] = Field("low", description="which end goes first")
    flip: bool = Field(True, description="reverse the order")


class Switch(Zeroing):
    Settings = SwitchSettings

    def scores(self, model, targets, masks, loader_factory, step):
        sign = (1.0 if self.options.side == "low" else -1.0) * (-1.0 if self.options.flip else 1.0)
        return signed_magnitudes(self, targets, sign)


def test_literal_and_switch_settings_become_options(monkeypatch, tmp_path, tiny_model_dir, capsys):
    monkeypatch.setitem(METHODS, "switch", Switch)
    base = ["prune", tiny_model_dir, "--method", "switch", "--sparsity", "0.5", "--scope", "uniform"]
    assert main(base + ["--side", "middle", "--out", str(tmp_path / "x")]) == 2
    assert "--side input should be 'low' or 'high'" in capsys.readouterr().err
    out = tmp_path / "o"  # low, not flipped: the smallest go first (as magnitude)
    assert main(base + ["--side", "low", "--no-flip", "--out", str(out)]) == 0
    settings = json.loads((out / "sparsity.json").read_text())["settings"]
    assert settings["side"] == "low" and settings["flip"] is False
    _kept_are_the_smallest(out, tiny_model_dir, smallest=False)


def test_a_setting_named_like_a_prune_option_is_one_line(monkeypatch, tiny_model_dir, capsys):
    class Clash(Settings):
        seed: int = 3

    monkeypatch.setattr(Switch, "Settings", Clash)
    monkeypatch.setitem(METHODS, "switch", Switch)
    assert main(["prune", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: method 'switch' has a setting 'seed', a name obert prune already uses: rename it"


def test_settings_reach_the_method_after_copy_and_assignment():
    from obert.pruning.methods import OBert
    from obert.pruning.settings import PruneConfig

    c = PruneConfig(0.5).model_copy(update={"num_grads": 8, "structure": "block4"})
    assert OBert(c).options.num_grads == 8 and c.options.fisher_block_size == 32  # block4's default
    assert c == PruneConfig(0.5, num_grads=8, structure="block4")
    assert "num_grads" not in PruneConfig(0.5, num_grads=8).model_copy(update={"method": "magnitude"}).as_dict()
    c.num_grads = 4
    assert c.options.num_grads == 4 and c.as_dict()["num_grads"] == 4
    with pytest.raises(ValueError):
        c.num_grads = 0
    # A setting of another method given as None counts as not given (--set pruning.num_grads=null).
    assert PruneConfig(0.5, method="magnitude", num_grads=None).as_dict()["method"] == "magnitude"


def test_prune_options_exist_without_main():
    """Tools that run the Typer app directly (CliRunner, doc generators) see the options too."""
    from typer.testing import CliRunner

    from obert.cli.main import app

    result = CliRunner().invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "--num-grads" in result.output
