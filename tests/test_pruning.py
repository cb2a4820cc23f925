"""Target discovery, Fisher collection and one-shot pruning on tiny random encoders."""

import copy

import pytest
import torch
from conftest import encoded_rows, tiny_model

from obert import MaskSet, ObertError, PruneConfig, find_targets, prune_model
from obert.pruning.fisher import collect_fisher, plan_memory
from obert.core.obs import fisher_inverse_blocks
from obert.pruning.fisher import gradient_batches
from obert.pruning.driver import select_groups

EXPECTED = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                   "ffn.lin1", "ffn.lin2"],
}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_targets_are_the_transformer_block_linears(family):
    model = tiny_model(family)
    names = [t.name for t in find_targets(model)]
    assert len(names) == 2 * 6
    for layer in range(2):
        for suffix in EXPECTED[family]:
            assert any(n.endswith(f".{layer}.{suffix}") for n in names), (suffix, names)
    assert not any("classifier" in n or "embeddings" in n or "pooler" in n for n in names)


def test_include_exclude_patterns():
    model = tiny_model("bert")
    no_ffn = find_targets(model, exclude=[r"intermediate|output\.dense$"])
    assert all("intermediate" not in t.name for t in no_ffn)
    assert len(no_ffn) == 2 * 3  # q, k, v per layer
    with_head = find_targets(model, include=[r"classifier"])
    assert [t.name for t in with_head] == ["classifier"]
    with pytest.raises(ObertError, match="no prunable layers"):
        find_targets(model, include=["nothing-matches"])
    with pytest.raises(ObertError, match="no prunable layers"):
        find_targets(torch.nn.Sequential(torch.nn.ReLU()))


def test_collected_fisher_matches_explicit_per_batch_gradients(tmp_path):
    """collect_fisher == fisher_inverse_blocks of gradients computed by hand, with masking/padding."""
    torch.manual_seed(0)
    model = tiny_model("bert").double()
    targets = find_targets(model)[:3]
    masks = MaskSet(targets)
    masks.set(targets[0].name, torch.rand_like(targets[0].module.weight) > 0.3)
    ds = encoded_rows(tmp_path, model)
    loaders = gradient_batches(ds, 8)
    B, m, damp = 48, 6, 1e-4  # 32*32 = 1024 is not a multiple of 48: exercises the padding
    got = collect_fisher(model, targets, masks, loaders, num_grads=m, block_size=B, damp=damp,
                         progress=False, log=lambda s: None)
    model.eval()
    rows = {t.name: [] for t in targets}
    from obert.pruning.fisher import batch_stream

    for batch in batch_stream(loaders, m, 0):
        model.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            g = (t.module.weight.grad * masks.masks[t.name]).reshape(-1)
            rows[t.name].append(torch.nn.functional.pad(g, (0, (-g.numel()) % B)))
    for t in targets:
        expected = fisher_inverse_blocks(torch.stack(rows[t.name]).double(), B, damp)
        assert got.get(t.name).dtype == torch.float64
        torch.testing.assert_close(got.get(t.name), expected, rtol=1e-9, atol=1e-6)
    # Several passes (a small memory budget) give the same blocks as one pass.
    plan_bytes = 8 * 1024 * (B + 1) + 2 * 8 * 1056 * B  # a float64 model keeps float64 blocks
    split = collect_fisher(model, targets, masks, loaders, num_grads=m, block_size=B, damp=damp,
                           max_memory_gb=(plan_bytes * 1.2) / 1024**3, progress=False,
                           log=lambda s: None)
    assert len(split.plan.groups) > 1 and split.spilled
    for t in targets:
        torch.testing.assert_close(split.get(t.name), got.get(t.name))
    split.close()


def test_memory_plan_fails_early_when_one_layer_cannot_fit():
    with pytest.raises(ObertError, match="GiB"):
        plan_memory([10_000_000], 50, 256, budget_bytes=100 * 1024**2)
    plan = plan_memory([1000] * 10, 50, 256, budget_bytes=10**9)
    assert len(plan.groups) == 1 and plan.fisher_bytes == 4 * 10_000 * 50


def test_select_groups_exact_global_and_uniform():
    torch.manual_seed(0)
    scores = {"a": torch.rand(100), "b": torch.rand(37) + 0.5}
    g = select_groups(scores, 0.5, "global")
    assert sum(int(v.sum()) for v in g.values()) == round(0.5 * 137)
    # global: one threshold across layers
    assert g["a"].sum() > g["b"].sum()
    thr = max(float(scores[k][g[k]].max()) for k in g)
    assert all(float(scores[k][~g[k]].min()) >= thr for k in g)
    u = select_groups(scores, 0.5, "uniform")
    assert int(u["a"].sum()) == 50 and int(u["b"].sum()) == round(0.5 * 37)


@pytest.mark.parametrize("method,structure,scope,update", [
    ("obert", "unstructured", "global", "joint"),
    ("obert", "block4", "global", "independent"),
    ("obert", "unstructured", "uniform", "independent"),
    ("magnitude", "block4", "uniform", "joint"),
    ("magnitude", "unstructured", "global", "joint"),
])
def test_prune_model_reaches_exact_sparsity(tmp_path, method, structure, scope, update):
    model = tiny_model("bert")
    targets = find_targets(model)
    ds = encoded_rows(tmp_path, model)
    own = dict(update=update, num_grads=8, fisher_block_size=32 if structure == "block4" else 50,
               damp=1e-5) if method == "obert" else {}  # oBERT's own settings
    cfg = PruneConfig(sparsity=0.6, method=method, structure=structure, scope=scope,
                      grad_batch_size=8, num_recomputations=2, **own)
    masks, report = prune_model(model, targets, cfg, gradient_batches(ds, 8), log=lambda s: None)
    g = cfg.group_size
    total = sum(t.numel for t in targets)
    zeros = sum(int((t.module.weight == 0).sum()) for t in targets)
    # global: exact to one group overall; uniform: exact to one group in every layer (below)
    assert abs(zeros - 0.6 * total) <= (g if scope == "global" else g * len(targets))
    assert [s["target_sparsity"] for s in report.steps] == pytest.approx([0.3, 0.6])
    for t in targets:
        w = t.module.weight
        assert torch.equal(w == 0, ~masks.masks[t.name])
        if structure == "block4":  # whole groups of 4 along the input dimension
            groups = (w == 0).reshape(w.shape[0], -1, 4)
            assert torch.all(groups.all(-1) | ~groups.any(-1))
        if scope == "uniform":
            assert abs(int((w == 0).sum()) - 0.6 * w.numel()) <= g


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_prune_other_families(tmp_path, family):
    model = tiny_model(family)
    targets = find_targets(model)
    ds = encoded_rows(tmp_path, model)
    cfg = PruneConfig(sparsity=0.5, structure="block4", num_grads=4, grad_batch_size=8, damp=1e-5)
    prune_model(model, targets, cfg, gradient_batches(ds, 8), log=lambda s: None)
    zeros = sum(int((t.module.weight == 0).sum()) for t in targets)
    assert abs(zeros - 0.5 * sum(t.numel for t in targets)) <= 4


def test_obert_update_changes_kept_weights_and_magnitude_does_not(tmp_path):
    base = tiny_model("bert")
    ds = encoded_rows(tmp_path, base)
    after = {}
    for method in ("obert", "magnitude"):
        model = copy.deepcopy(base)
        targets = find_targets(model)
        own = dict(num_grads=8, damp=1e-10) if method == "obert" else {}
        cfg = PruneConfig(sparsity=0.5, method=method, grad_batch_size=8, **own)
        prune_model(model, targets, cfg, gradient_batches(ds, 8), log=lambda s: None)
        after[method] = {t.name: t.module.weight.detach().clone() for t in targets}
    moved = []
    for name, w in after["magnitude"].items():
        ref = dict(base.named_modules())[name].weight.detach()
        kept = w != 0
        assert torch.equal(w[kept], ref[kept])  # magnitude only zeroes
        ob = after["obert"][name]
        moved.append(float((ob[ob != 0] - ref[ob != 0]).abs().max() / ref.abs().max()))
    assert max(moved) > 1e-2  # the OBS update moves the surviving weights


def _magnitude_pruned(tmp_path, sparsity):
    """A tiny BERT magnitude-pruned to ``sparsity``: (model, targets, batches, masks)."""
    model = tiny_model("bert")
    targets = find_targets(model)
    masks, _ = prune_model(model, targets, PruneConfig(sparsity=sparsity, method="magnitude"),
                           log=lambda s: None)
    return model, targets, encoded_rows(tmp_path, model), masks


def test_masks_survive_training_steps(tmp_path):
    model, targets, ds, masks = _magnitude_pruned(tmp_path, 0.7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks.attach(opt)
    model.train()
    for batch in list(ds.loader(16, shuffle=True))[:3]:
        opt.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            assert torch.all(t.module.weight.grad[~masks.masks[t.name]] == 0)
        opt.step()
    for t in targets:
        assert torch.all(t.module.weight[~masks.masks[t.name]] == 0)
        assert float((t.module.weight == 0).float().mean()) == pytest.approx(
            float((~masks.masks[t.name]).float().mean()))
    # Pruning again from a pruned model keeps the old zeros and adds more.
    old = {t.name: masks.masks[t.name].clone() for t in targets}
    masks2, _ = prune_model(model, targets, PruneConfig(sparsity=0.8, method="obert", num_grads=4,
                                                        grad_batch_size=8, damp=1e-5),
                            gradient_batches(ds, 8), masks=MaskSet.from_zeros(targets), log=lambda s: None)
    for t in targets:
        assert torch.all(~masks2.masks[t.name][~old[t.name]])


def test_block4_on_top_of_unstructured_keeps_old_zeros(tmp_path):
    model, targets, ds, masks = _magnitude_pruned(tmp_path, 0.3)
    old = {t.name: masks.masks[t.name].clone() for t in targets}
    cfg = PruneConfig(sparsity=0.5, structure="block4", num_grads=4, grad_batch_size=8, damp=1e-6)
    masks, _ = prune_model(model, targets, cfg, gradient_batches(ds, 8), masks=masks,
                           log=lambda s: None)
    for t in targets:
        assert torch.all(t.module.weight[~old[t.name]] == 0)
        assert torch.equal(t.module.weight == 0, ~masks.masks[t.name])


def test_prune_config_validation():
    for bad in (dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=0.5, method="random"),
                dict(sparsity=0.5, structure="block3"), dict(sparsity=0.5, damp=0),
                dict(sparsity=0.5, structure="block4", fisher_block_size=50),
                dict(sparsity=0.5, num_grads=0), dict(sparsity=0.5, update="both")):
        with pytest.raises(ObertError):
            PruneConfig(**bad)


def test_bert_base_fisher_fits_a_24gb_machine():
    """BERT-base at B=50, m=1024 (17 GB of Fisher blocks) is planned into passes within budget."""
    hidden, inter, layers = 768, 3072, 12
    sizes = [hidden * hidden] * 4 + [hidden * inter] * 2
    sizes = [s + (-s) % 50 for s in sizes] * layers
    budget = int(0.8 * 22 * 1024**3)
    plan = plan_memory(sizes, 50, 1024, budget)
    assert plan.fisher_bytes == 4 * 50 * sum(sizes)  # ~17 GB
    assert len(plan.groups) <= 3
    # A smaller budget needs more passes, never more memory.
    tight = plan_memory(sizes, 50, 1024, budget // 2)
    assert len(tight.groups) > len(plan.groups)
    for p, limit in ((plan, budget), (tight, budget // 2)):
        for group in p.groups:
            assert p.scratch_bytes + sum(4 * (50 + p.chunk) * sizes[i] for i in group) <= limit
        assert sorted(i for g in p.groups for i in g) == list(range(len(sizes)))
