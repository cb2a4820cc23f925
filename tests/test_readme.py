"""The README's library examples run as written, on the tiny model and data (the names they take
as given, such as ``model`` and ``train_dataset``, are supplied here; the gradual example's m =
1024 gradients per pruning step is lowered to 8 so that its 30 epochs take seconds)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import encoded_rows, tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_library_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and any("prune_model" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from conftest import make_tokenizer

    block = python_blocks()[index].replace("num_grads=1024", "num_grads=8")
    model = tiny_model("bert")
    train_dataset = encoded_rows(tmp_path, model, n=16)  # one optimizer step per epoch
    before = copy.deepcopy(model)
    names = {
        "model": model, "train_dataset": train_dataset, "teacher": before,
        "data_collator": DataCollatorWithPadding(make_tokenizer(tmp_path)),
        "training_args": TrainingArguments(output_dir=str(tmp_path / "t"), num_train_epochs=30,
                                           per_device_train_batch_size=16, report_to=[],
                                           save_strategy="no", use_cpu=True, disable_tqdm=True),
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
    }
    exec(compile(block, f"README.md python block {index + 1}", "exec"), names)  # noqa: S102
    if "prune_model" in block:  # the example prunes to 80% and keeps the masks
        masks = names["masks"]
        assert masks.stats()["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    if "trainer.train()" in block:  # 30 epochs, pruned to the schedule's final sparsity
        assert names["trainer"].state.global_step == 30
        assert names["pruning"].masks.stats()["global_sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_readme_recipes_validate():
    """The recipe examples (YAML blocks with an output_dir) are valid recipes."""
    import yaml

    from obert.training.recipe import load_recipe
    from obert.training.stages import load_staged

    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```",
                                                    README.read_text(encoding="utf-8"), flags=re.S)]
    recipes = [b for b in blocks if isinstance(b, dict) and "output_dir" in b]
    assert any("stages" in b for b in recipes)
    for doc in recipes:
        load_staged(None, doc=doc) if "stages" in doc else load_recipe(doc=doc)
