"""Pinned behaviour: the masks that `obert prune` and `obert train` (with a shipped recipe) make
on the tiny model, as digests. Restructuring the code must leave them unchanged; a change of the
method itself updates them on purpose (say so in the commit). The same digests come out with
torch's and MKL's kernels forced down to AVX2 or SSE4.2 and with one thread, so they do not
depend on the CPU the tests run on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from obert.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PINNED = {
    "prune-obert": "e2918cce07873766",
    "prune-magnitude": "92117d4e517f513b",
    "train-obert80-recipe": "f9e14ee9a936f2da",
}


def mask_digest(path) -> str:
    """sha256 over every target layer's name and mask (weight != 0), in target order."""
    from transformers import AutoModelForSequenceClassification

    from obert import find_targets

    model = AutoModelForSequenceClassification.from_pretrained(path)
    h = hashlib.sha256()
    for t in find_targets(model):
        h.update(t.name.encode())
        h.update((t.module.weight != 0).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("method", ["obert", "magnitude"])
def test_prune_masks_are_pinned(method, tmp_path, data_files, tiny_model_dir):
    out = tmp_path / "out"
    own = ["--num-grads", 8, "--damp", 1e-6] if method == "obert" else []  # oBERT's settings
    assert main([str(a) for a in ["prune", tiny_model_dir, "--train-file", data_files[0],
                                  "--sparsity", 0.6, *own, "--grad-batch-size", 8,
                                  "--max-length", 16, "--method", method, "--out", out]]) == 0
    assert mask_digest(out) == PINNED[f"prune-{method}"]


def test_train_with_a_shipped_recipe_masks_are_pinned(tmp_path, data_files, tiny_model_dir):
    doc = yaml.safe_load((ROOT / "recipes" / "minilm_debian_obert80.yaml").read_text())
    doc["model"]["path"] = doc["distillation"]["teacher"] = tiny_model_dir
    doc["data"] = {"train_file": data_files[0], "eval_file": data_files[1]}
    doc["training"].update(epochs=2, batch_size=16, max_length=16, eval_batch_size=16,
                           logging_steps=5)
    doc["pruning"].update(num_grads=8, grad_batch_size=8, end_epoch=1.0, frequency=0.5)
    doc["output_dir"] = str(tmp_path / "out")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["train", "--recipe", str(recipe), "--no-progress"]) == 0
    assert mask_digest(tmp_path / "out") == PINNED["train-obert80-recipe"]
