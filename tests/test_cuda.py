"""obert's CUDA paths on tiny random models, against CPU (float64) references.

Every test needs a GPU and is skipped without one (CI has none): run them on a CUDA machine
with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import (encoded_rows, reference_inverse, tiny_model, tiny_qa_recipe, tiny_recipe,
                      train_with_pruning_callback)

from obert import MaskSet, PruneConfig, find_targets, prune_model
from obert.device import available_memory
from obert.pruning.fisher import collect_fisher
from obert.core.obs import (StreamingFisher, fisher_inverse_blocks, invert_fisher, prune_update,
                       saliency, woodbury_fisher_inverse)
from obert.pruning.fisher import gradient_batches
from obert.training.oneshot import prune_sweep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
QUIET = dict(log=lambda s: None)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm())


# -- OBS math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fisher_saliency_and_update_on_cuda_match_float64_cpu(dtype):
    torch.manual_seed(0)
    m, d, B, damp = 48, 400, 40, 1e-3
    grads = torch.randn(m, d, dtype=torch.float64) * 0.1
    w = torch.randn(d, dtype=torch.float64) * 0.05
    pruned = torch.rand(d // 4) < 0.5  # whole groups of 4, so every update rule applies
    ref_finv = reference_inverse(grads, B, damp)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    g = grads.to(CUDA, dtype)
    finv = fisher_inverse_blocks(g, B, damp)
    assert finv.device.type == "cuda" and finv.dtype == dtype
    assert rel_err(finv, ref_finv) < tol
    stream = StreamingFisher(d, B, damp, dtype=dtype, device=CUDA)
    for chunk in torch.split(g, 5):
        stream.update(chunk)
    got = stream.inverse()
    assert got.device.type == "cuda" and rel_err(got, ref_finv) < tol
    wood = woodbury_fisher_inverse(g, B, damp)  # the paper's M-FAC-style rank-one updates
    assert wood.device.type == "cuda" and rel_err(wood, ref_finv) < (1e-8 if dtype == torch.float64 else 1e-3)

    wc = w.to(CUDA, dtype)
    for group in (1, 4):
        s = saliency(wc, finv, group)
        assert s.device.type == "cuda"
        assert rel_err(s, saliency(w, ref_finv, group)) < tol
    mask = pruned.repeat_interleave(4)
    for joint in (True, False):
        new = prune_update(wc, finv, mask.to(CUDA), joint=joint, group_size=4)
        ref = prune_update(w, ref_finv, mask, joint=joint, group_size=4)
        assert new.device.type == "cuda" and new.dtype == dtype
        assert torch.all(new.cpu()[mask] == 0)
        assert rel_err(new, ref) < 10 * tol


def test_indefinite_blocks_fall_back_to_float64_on_cuda():
    """The float64 eigendecomposition fallback of ``invert_fisher`` runs on the GPU too.

    A Gram block with a negative eigenvalue fails Cholesky on every device (an ill-conditioned
    but PSD one may not: cuSOLVER's float32 Cholesky can succeed where the CPU's fails).
    """
    torch.manual_seed(0)
    B, damp = 8, 1e-3
    good = torch.randn(20, B, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(B, B, dtype=torch.float64))
    bad = q @ torch.diag(torch.tensor([-3.0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float64)) @ q.T
    gram = torch.stack([good.T @ good, bad, good.T @ good * 2]).float()
    cpu = invert_fisher(gram.clone(), 4, damp)
    gpu = invert_fisher(gram.to(CUDA), 4, damp)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-3)
    fisher = gram[1].double() / 4 + damp * torch.eye(B, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(fisher)
    expected = evecs @ torch.diag(1 / evals.clamp(min=damp)) @ evecs.T
    assert rel_err(gpu[1], expected) < 1e-5
    for b in (0, 2):
        assert rel_err(gpu[b], torch.linalg.inv(gram[b].double() / 4 + damp * torch.eye(B))) < 1e-4


# -- Fisher collection -------------------------------------------------------------------------
def test_collect_fisher_on_cuda_matches_cpu_also_when_spilled(tmp_path):
    model = tiny_model("bert").double()
    ds = encoded_rows(tmp_path, model)
    loaders = gradient_batches(ds, 8)
    kw = dict(num_grads=6, block_size=48, damp=1e-4, progress=False, **QUIET)
    targets = find_targets(model)[:3]
    ref = collect_fisher(model, targets, MaskSet(targets), loaders, **kw)
    gpu_model = copy.deepcopy(model).to(CUDA)
    gpu_targets = find_targets(gpu_model)[:3]
    masks = MaskSet(gpu_targets)
    got = collect_fisher(gpu_model, gpu_targets, masks, loaders, **kw)  # budget from the GPU
    assert len(got.plan.groups) == 1
    # A budget that forces one pass per layer: finished inverses wait on disk.
    split = collect_fisher(gpu_model, gpu_targets, masks, loaders,
                           max_memory_gb=(8 * 1056 * (48 + 1) + 2 * 8 * 1056 * 48) * 1.2 / 1024**3,
                           **kw)
    assert len(split.plan.groups) > 1 and split.spilled
    for t in targets:
        for result in (got, split):
            finv = result.get(t.name)
            assert finv.device.type == "cuda" and finv.dtype == torch.float64
            torch.testing.assert_close(finv.cpu(), ref.get(t.name), rtol=1e-7, atol=1e-6)
    split.close()
    # Pruning with that budget (scores and updates read the spilled inverses back) equals
    # pruning with the whole budget.
    results = []
    for budget in (split.plan.budget_bytes / 1024**3, None):
        m = copy.deepcopy(gpu_model)
        ts = find_targets(m)[:3]
        cfg = PruneConfig(0.5, num_grads=6, grad_batch_size=8, fisher_block_size=48, damp=1e-4,
                          max_memory_gb=budget)
        prune_model(m, ts, cfg, loaders, **QUIET)
        results.append([t.module.weight.detach().cpu() for t in ts])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_cuda_memory_budget_counts_the_allocator_cache():
    torch.cuda.synchronize()
    x = torch.empty(256 * 1024**2, dtype=torch.uint8, device=CUDA)
    del x  # stays reserved by PyTorch's caching allocator, invisible to the driver's free count
    free_driver = torch.cuda.mem_get_info()[0]
    assert available_memory(CUDA) >= free_driver + 256 * 1024**2


# -- one-shot pruning --------------------------------------------------------------------------
def _prune(model, ds, **cfg):
    targets = find_targets(model)
    own = {"num_grads": 8} if cfg.get("method", "obert") == "obert" else {}  # oBERT's settings
    config = PruneConfig(grad_batch_size=8, num_recomputations=2, **own, **cfg)
    masks, report = prune_model(model, targets, config, gradient_batches(ds, 8), **QUIET)
    return targets, masks, report


@pytest.mark.parametrize("structure", ["unstructured", "block4"])
def test_oneshot_obert_on_cuda_matches_cpu(tmp_path, structure):
    cfg = dict(sparsity=0.6, structure=structure, damp=1e-5)
    g = 4 if structure == "block4" else 1
    # float64: the GPU run is the CPU run (same masks, same weights up to rounding).
    base = tiny_model("bert").double()
    ds = encoded_rows(tmp_path, base)
    cpu_t, cpu_masks, _ = _prune(copy.deepcopy(base), ds, **cfg)
    gpu_t, gpu_masks, report = _prune(copy.deepcopy(base).to(CUDA), ds, **cfg)
    total = sum(t.numel for t in gpu_t)
    zeros = sum(int((t.module.weight == 0).sum()) for t in gpu_t)
    assert abs(zeros - 0.6 * total) <= g
    assert report.steps[-1]["sparsity"] == pytest.approx(0.6, abs=g / total)
    for a, b in zip(cpu_t, gpu_t):
        assert b.module.weight.device.type == "cuda"
        assert gpu_masks.masks[b.name].device.type == "cuda"
        assert torch.equal(gpu_masks.masks[b.name].cpu(), cpu_masks.masks[a.name])
        assert torch.equal((b.module.weight == 0).cpu(), ~cpu_masks.masks[a.name])
        torch.testing.assert_close(b.module.weight.cpu(), a.module.weight, rtol=1e-6, atol=1e-8)
        if structure == "block4":
            z = (b.module.weight == 0).reshape(b.module.weight.shape[0], -1, 4)
            assert torch.all(z.all(-1) | ~z.any(-1))
    # float32 (what users run): target reached; masks agree with the CPU run but for near-ties.
    base = tiny_model("bert")
    cpu_t, cpu_masks, _ = _prune(copy.deepcopy(base), ds, **cfg)
    gpu_t, gpu_masks, _ = _prune(copy.deepcopy(base).to(CUDA), ds, **cfg)
    zeros = sum(int((t.module.weight == 0).sum()) for t in gpu_t)
    assert abs(zeros - 0.6 * total) <= g
    same = sum(int((gpu_masks.masks[b.name].cpu() == cpu_masks.masks[a.name]).sum())
               for a, b in zip(cpu_t, gpu_t))
    assert same / total > 0.98, same / total


def test_magnitude_and_sweep_on_cuda(tmp_path):
    base = tiny_model("bert")
    ds = encoded_rows(tmp_path, base)
    model = copy.deepcopy(base).to(CUDA)
    targets, masks, _ = _prune(model, ds, sparsity=0.5, method="magnitude", structure="block4",
                               scope="uniform")
    for t in targets:
        assert abs(int((t.module.weight == 0).sum()) - 0.5 * t.numel) <= 4
    dense = copy.deepcopy(base).to(CUDA)
    configs = [PruneConfig(sparsity=s, num_grads=8, grad_batch_size=8, damp=1e-5) for s in (0.5, 0.8)]
    seen = []
    for config, pruned, masks, report, info in prune_sweep(
            dense, configs, lambda bs: gradient_batches(ds, bs), **QUIET):
        targets = find_targets(pruned)
        zeros = sum(int((t.module.weight == 0).sum()) for t in targets)
        total = sum(t.numel for t in targets)
        assert abs(zeros / total - config.sparsity) <= 1 / total
        assert next(pruned.parameters()).device.type == "cuda"
        seen.append(config.sparsity)
    assert seen == [0.5, 0.8]


# -- gradual pruning through the Trainer -------------------------------------------------------
def _zeros(model):
    return {t.name: (t.module.weight == 0).detach().clone() for t in find_targets(model)}


def test_gradual_recipe_on_cuda_with_fp16_and_distillation(tmp_path, data_files, tiny_model_dir):
    from transformers import TrainerCallback

    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    seen = {"steps": 0, "zeros": None}

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            assert args.fp16 and next(model.parameters()).device.type == "cuda"

        def on_step_end(self, args, state, control, model=None, **kwargs):
            assert next(model.parameters()).device.type == "cuda"
            zeros = _zeros(model)
            if seen["zeros"] is not None:  # pruned weights stay exactly 0 (masks only grow)
                for name, z in seen["zeros"].items():
                    assert bool(zeros[name][z].all()), name
            seen["zeros"] = zeros
            seen["steps"] += 1

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir)
    doc["training"].update(device="cuda", fp16=True)
    r = load_recipe(doc=doc)
    metrics = run_recipe(r, progress=False, extra_callbacks=[Check()])
    out = Path(r.output_dir)
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert seen["steps"] == 24
    assert metrics["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert [s["step"] for s in sparsity["steps"]] == [6, 12, 18]
    assert [round(s["target_sparsity"], 4) for s in sparsity["steps"]] == [0.5, 0.7625, 0.8]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] == metrics["loss"]  # not NaN
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out)
    targets = find_targets(saved)
    zeros = sum(int((t.module.weight == 0).sum()) for t in targets)
    assert zeros == sparsity["num_pruned"]
    for t in targets:  # the last step's zeros are the saved zeros
        assert torch.equal(t.module.weight == 0, seen["zeros"][t.name].cpu())


def test_callback_in_a_plain_fp16_trainer_on_cuda(tmp_path, data_files, tiny_model_dir):
    """Masks live on the GPU; after every fp16 optimizer step pruned weights and their Adam
    moments are exactly 0."""
    def step_check(pruning, optimizer):
        for t in pruning.masks.targets:
            m = pruning.masks.masks[t.name]
            assert m.device.type == "cuda" and t.module.weight.device.type == "cuda"
            assert bool((t.module.weight[~m] == 0).all())
            st = optimizer.state.get(t.module.weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:  # absent while the fp16 scaler skips the first steps
                    assert bool((st[key][~m] == 0).all())

    pruning, checked = train_with_pruning_callback(
        tmp_path, data_files, tiny_model_dir,
        PruneConfig(0.6, structure="block4", num_grads=8, grad_batch_size=8, fisher_block_size=16),
        step_check, fp16=True)
    assert len(checked) == 18 and checked[0] == pytest.approx(0.3, abs=4e-3)
    assert checked[-1] == pytest.approx(0.6, abs=4e-3)
    assert [h["step"] for h in pruning.history] == [0, 6, 12]


def test_gradual_qa_recipe_on_cuda_block4_fp16(tmp_path):
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_qa_recipe(tmp_path)
    doc["training"].update(device="cuda", fp16=True)
    doc["pruning"]["structure"] = "block4"
    metrics = run_recipe(load_recipe(doc=doc), progress=False)
    assert 0.0 <= metrics["f1"] <= 100.0 and metrics["global_sparsity"] == pytest.approx(0.6, abs=4e-3)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in w.items():
        if "encoder.layer" in k and k.endswith("weight") and v.dim() == 2:
            z = (v == 0).reshape(v.shape[0], -1, 4)
            assert torch.all(z.all(-1) | ~z.any(-1)), k


# -- the CLI's --device ------------------------------------------------------------------------
def test_cli_finetune_and_prune_on_cuda_match_cpu(tmp_path, data_files, tiny_model_dir, capsys):
    from obert.cli.main import main

    train, evalf = data_files
    ft = tmp_path / "ft"
    assert main(["finetune", tiny_model_dir, "--train-file", train, "--eval-file", evalf,
                 "--out", str(ft), "--epochs", "1", "--batch-size", "16", "--max-length", "16",
                 "--lr", "1e-3", "--device", "cuda"]) == 0
    assert 0 <= json.loads((ft / "metrics.json").read_text())["accuracy"] <= 1
    for structure, sparsity in (("unstructured", 0.7), ("block4", 0.5)):
        records, weights = {}, {}
        for device in ("cuda", "cpu"):
            out = tmp_path / f"{structure}-{device}"
            assert main(["prune", str(ft), "--train-file", train, "--eval-file", evalf,
                         "--out", str(out), "--sparsity", str(sparsity), "--structure", structure,
                         "--num-grads", "8", "--grad-batch-size", "8", "--damp", "1e-4",
                         "--max-length", "16", "--num-recomputations", "2",
                         "--device", device]) == 0, capsys.readouterr().err
            records[device] = json.loads((out / "sparsity.json").read_text())
            from safetensors.torch import load_file

            weights[device] = load_file(str(out / "model.safetensors"))
        rec = records["cuda"]
        assert abs(rec["global_sparsity"] - sparsity) <= 4 / rec["num_params"]
        assert rec["num_pruned"] == records["cpu"]["num_pruned"]
        names = [k for k in weights["cpu"] if "encoder.layer" in k and k.endswith("weight")
                 and weights["cpu"][k].dim() == 2]
        same = sum(int(((weights["cuda"][k] == 0) == (weights["cpu"][k] == 0)).sum()) for k in names)
        total = sum(weights["cpu"][k].numel() for k in names)
        assert same / total > 0.98, (structure, same / total)
    out = tmp_path / "mag"
    assert main(["prune", str(ft), "--sparsity", "0.4", "--method", "magnitude",
                 "--out", str(out), "--device", "cuda"]) == 0
    assert json.loads((out / "sparsity.json").read_text())["global_sparsity"] == pytest.approx(0.4, abs=1e-3)


def test_finetune_keeps_a_cpu_model_on_the_cpu(tmp_path, data_files, tiny_model_dir):
    """``--device cpu`` on a CUDA machine trains on the CPU (the Trainer would move it)."""
    from transformers import TrainerCallback

    from obert.tasks.data import Encoded, load_file
    from obert.tasks.classification import load_classifier
    from obert.training.finetune import finetune

    tok, model = load_classifier(tiny_model_dir)
    data = Encoded(load_file(data_files[0]), tok, model.config.label2id, 16)
    devices = []

    class Where(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            devices.append(next(model.parameters()).device.type)

    finetune(model, tok, data, epochs=1, lr=1e-3, batch_size=32, progress=False, callbacks=[Where()])
    assert devices and set(devices) == {"cpu"}
