"""Model cards: every model directory obert writes says what was done, from what, with which
sparsity and metrics, and (for a recipe) the recipe itself."""

from __future__ import annotations

import json

import yaml
from conftest import block4_pruned_dir, tiny_recipe

from obert.card import model_card
from obert.cli.main import main


def test_model_card_sections():
    card = model_card("m", what=["step one", "step two"], source="src",
                      sparsity={"global_sparsity": 0.5, "num_pruned": 5, "num_params": 10,
                                "method": "obert", "structure": "block4",
                                "layers": {"a.b": {"numel": 10, "sparsity": 0.5}}},
                      metrics={"accuracy": 0.875, "timings": {"x": 1}}, recipe_text="a: 1\n")
    assert card.startswith("# m\n")
    for text in ("- step one\n- step two", "Starting model: `src`", "50.00% (5 of 10 weights",
                 "| `a.b` | 10 | 50.00% |", "| accuracy | 0.8750 |", "```yaml\na: 1\n```"):
        assert text in card, text
    assert "timings" not in card  # nested values stay in metrics.json


def test_every_command_writes_a_card(tmp_path, data_files, tiny_model_dir):
    pruned = tmp_path / "pruned"
    assert main(["prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(pruned)]) == 0
    card = (pruned / "README.md").read_text()
    record = json.loads((pruned / "sparsity.json").read_text())
    assert "one-shot magnitude pruning (unstructured, global threshold" in card
    assert f"{record['global_sparsity']:.2%}" in card and f"Starting model: `{tiny_model_dir}`" in card

    dropped = tmp_path / "dropped"
    assert main(["drop-layers", str(pruned), "--keep", "1", "--out", str(dropped)]) == 0
    assert "kept transformer layers 1 of 2" in (dropped / "README.md").read_text()

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--no-progress"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "gradual obert pruning (unstructured, global) from 0.5 to 0.8" in card
    assert "distillation from" in card and "```yaml\nmodel:" in card

    src, _ = block4_pruned_dir(tiny_model_dir, tmp_path / "b4")
    compiled = tmp_path / "compiled"
    assert main(["compile", str(src), "--choose", "sparsity", "--out", str(compiled)]) == 0
    assert "compiled for obert's sparse CPU runtime (float32" in (compiled / "README.md").read_text()
