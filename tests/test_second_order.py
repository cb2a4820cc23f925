"""The second-order family beside oBERT: WoodFisher (Woodbury-built inverses), against oBERT's
estimator on the same gradients and end to end through `obert prune` and a recipe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import encoded_rows, tiny_model, tiny_recipe

from obert import PruneConfig, find_targets
from obert.cli.main import main
from obert.core.obs import StreamingWoodbury, fisher_inverse_blocks
from obert.errors import ObertError
from obert.model.masks import MaskSet
from obert.pruning.fisher import gradient_batches
from obert.pruning.methods import METHODS


@pytest.mark.parametrize("m,d,B,chunks", [(7, 30, 10, [7]), (9, 40, 8, [2, 3, 4]), (20, 50, 50, [1] * 20),
                                          (40, 60, 12, [33, 7])])
def test_streaming_woodbury_equals_the_gram_inverse(m, d, B, chunks):
    torch.manual_seed(m)
    grads = torch.randn(m, d, dtype=torch.float64)
    acc = StreamingWoodbury(d, B, 1e-3, m, dtype=torch.float64)
    start = 0
    for c in chunks:
        acc.update(grads[start:start + c])
        start += c
    torch.testing.assert_close(acc.inverse(), fisher_inverse_blocks(grads, B, 1e-3), rtol=1e-9, atol=1e-6)
    with pytest.raises(ObertError, match="more than the"):
        acc.update(grads[:1])
    early = StreamingWoodbury(d, B, 1e-3, m, dtype=torch.float64)
    early.update(grads[:1])
    with pytest.raises(ObertError, match="1 of the"):
        early.inverse()


def test_woodbury_steps_equal_the_rank_one_recursion():
    """k gradients per Woodbury step (float32, MiniLM-like damping) give what the paper's rank-one
    recursion, written out here gradient by gradient in float64, gives."""
    torch.manual_seed(3)
    m, d, B, damp = 37, 60, 20, 1e-4
    grads = torch.randn(m, d) * 1e-2
    ref = (torch.eye(B, dtype=torch.float64) / damp).repeat(d // B, 1, 1)
    for g in grads.double().reshape(m, d // B, B):
        fg = ref @ g.unsqueeze(-1)
        ref -= fg @ fg.transpose(1, 2) / (m + g.unsqueeze(1) @ fg)
    acc = StreamingWoodbury(d, B, damp, m)
    acc.update(grads)
    got = acc.inverse().double()
    assert float(((got - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max()) < 1e-4


def test_woodbury_steps_redo_failed_inner_inverses_in_float64(monkeypatch):
    """Where the batched float32 Cholesky of ``m I + G F^-1 G^T`` fails (reported, the matrix
    left as it was), the step uses its float64 inverse: the result is the same matrix."""
    from obert.core import obs

    torch.manual_seed(4)
    grads = torch.randn(20, 40)
    expected = fisher_inverse_blocks(grads.double(), 10, 1e-2)
    real = obs.spd_inverse_

    def failing(a, scale=1.0, shift=None, **kw):  # every other block "fails"
        keep = a[1::2].clone()
        info = real(a, scale, shift, **kw)
        a[1::2] = keep
        info[1::2] = 1
        return info

    def woodbury() -> torch.Tensor:
        acc = StreamingWoodbury(40, 10, 1e-2, 20)
        acc.update(grads)
        return acc.inverse().double()

    plain = woodbury()
    monkeypatch.setattr(obs, "spd_inverse_", failing)
    got = woodbury()
    rel = lambda a, b: (a - b).norm(dim=(1, 2)) / b.norm(dim=(1, 2))  # noqa: E731
    # float32 accuracy at cond(F) ~ 1e3 (without the float64 redo, blocks 1 and 3 would hold the
    # un-inverted G F^-1 G^T: errors of order 1); the redone blocks are no less exact.
    assert float(rel(got, expected).max()) < 2e-4
    assert bool((rel(got, expected)[1::2] <= rel(plain, expected)[1::2] * 1.01).all())


def _scores(method: str, tmp_path, **own) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = tiny_model("bert").double()
    targets = find_targets(model)
    cfg = PruneConfig(0.5, method=method, grad_batch_size=8,
                      **{"num_grads": 6, "fisher_block_size": 16, "damp": 1e-4, **own})
    m = METHODS[method](cfg)
    loaders = gradient_batches(encoded_rows(tmp_path, model), 8)
    return m.scores(model, targets, MaskSet(targets), loaders, step=0), (m, targets)


def test_woodfisher_scores_and_updates_equal_obert_single_weights(tmp_path):
    """Same gradients, same damping and blocks: WoodFisher's recursion gives oBERT's group-1
    saliencies and (with the independent update) the same weights."""
    wf, (wm, wt) = _scores("woodfisher", tmp_path)
    ob, (om, ot) = _scores("obert", tmp_path, update="independent")
    assert wm.options.update == "independent"  # WoodFisher's own default
    for name in ob:
        torch.testing.assert_close(wf[name], ob[name], rtol=1e-8, atol=1e-12)
    prune = {t.name: wf[t.name].reshape(t.module.weight.shape) < wf[t.name].median() for t in wt}
    wm.update(wt, prune)
    om.update(ot, prune)
    for a, b in zip(wt, ot):
        torch.testing.assert_close(a.module.weight, b.module.weight, rtol=1e-8, atol=1e-10)
        assert bool((a.module.weight[prune[a.name]] == 0).all())


def test_woodfisher_refuses_groups():
    with pytest.raises(ObertError, match="woodfisher prunes single weights"):
        PruneConfig(0.5, method="woodfisher", structure="block4")


def test_woodfisher_through_obert_prune(tmp_path, tiny_model_dir, data_files):
    out = tmp_path / "wf"
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--method", "woodfisher",
                 "--sparsity", "0.6",
                 "--num-grads", "8", "--grad-batch-size", "8", "--fisher-block-size", "16",
                 "--max-length", "16", "--out", str(out)]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "woodfisher" and record["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert record["settings"]["update"] == "independent"


def test_woodfisher_through_a_recipe(tmp_path, data_files, tiny_model_dir):
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__method="woodfisher",
                      pruning__num_grads=8, pruning__fisher_block_size=16, training__epochs=3,
                      pruning__end_epoch=2)
    run_recipe(load_recipe(doc=doc), progress=False)
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["method"] == "woodfisher" and record["global_sparsity"] == pytest.approx(0.8, abs=1e-3)


# -- M-FAC pruning -------------------------------------------------------------------------------
@pytest.mark.parametrize("structure,update", [("unstructured", "joint"), ("unstructured", "independent"),
                                              ("block4", "joint"), ("block4", "independent")])
def test_mfac_equals_obert_on_the_same_blocks(tmp_path, structure, update):
    """With oBERT's block size, M-FAC's matrix-free scores and OBS updates are oBERT's (which are
    tested against explicit inverses), for single weights and groups of 4."""
    own = dict(structure=structure, update=update)
    mf, (mm, mt) = _scores("mfac", tmp_path, **own)
    ob, (om, ot) = _scores("obert", tmp_path, **own)
    for name in ob:
        torch.testing.assert_close(mf[name], ob[name], rtol=1e-7, atol=1e-12)
    g = om.config.group_size
    prune = {t.name: (mf[t.name] < mf[t.name].median()).repeat_interleave(g)
             .reshape(t.module.weight.shape) for t in mt}
    mm.update(mt, prune)
    om.update(ot, prune)
    for a, b in zip(mt, ot):
        torch.testing.assert_close(a.module.weight, b.module.weight, rtol=1e-7, atol=1e-9)
        assert bool((a.module.weight[prune[a.name]] == 0).all())


def test_mfac_paged_in_small_chunks_equals_one_chunk(tmp_path):
    """A memory budget of one block per step (blocks paged through memory) gives the curvature
    and the weights of one step holding every block; layers smaller than B are one block."""
    import obert.pruning.paged as paged

    one_block = 4 * 6 * 256 * 8 + 2 * 36 * 8  # a block of 256 weights, 6 float64 gradients
    assert paged.blocks_per_chunk(6, 256, int(1.5 * one_block), 8) == 1
    big, (bm, bt) = _scores("mfac", tmp_path, fisher_block_size=256)
    small, (sm, st) = _scores("mfac", tmp_path, fisher_block_size=256,
                              max_memory_gb=1.5 * one_block / 1024**3)
    assert set(sm._est.chunk_blocks.values()) == {1} and min(bm._est.chunk_blocks.values()) > 8
    assert {bm._est.blocks[t.name] for t in bt} == {256}
    assert all(bm._est.sizes[t.name] // 256 > 1 for t in bt)  # several blocks per layer
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=0, atol=0)
    prune = {t.name: big[t.name].reshape(t.module.weight.shape) < big[t.name].median() for t in bt}
    bm.update(bt, prune)
    sm.update(st, prune)
    for a, b in zip(bt, st):
        torch.testing.assert_close(a.module.weight, b.module.weight, rtol=1e-12, atol=1e-12)


def test_mfac_checks_memory_and_disk_before_taking_gradients(tmp_path, monkeypatch):
    import shutil as sh

    with pytest.raises(ObertError, match="one M-FAC block of 256 weights and 6 gradients needs"):
        _scores("mfac", tmp_path, fisher_block_size=256, max_memory_gb=1e-6)
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(ObertError, match="M-FAC gradients need .* on disk"):
        _scores("mfac", tmp_path, fisher_block_size=256)


@pytest.mark.parametrize("structure,block", [("unstructured", 512), ("block4", 100_000)])
def test_mfac_through_obert_prune(tmp_path, tiny_model_dir, data_files, structure, block):
    """Blocks of 512 weights, or whole layers (every layer is smaller than 100,000)."""
    out = tmp_path / "mf"
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--method", "mfac",
                 "--structure", structure, "--sparsity", "0.6", "--num-grads", "8",
                 "--grad-batch-size", "8", "--fisher-block-size", str(block), "--max-length", "16",
                 "--num-recomputations", "2", "--out", str(out)]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "mfac" and record["global_sparsity"] == pytest.approx(0.6, abs=4e-3)
    assert record["settings"]["fisher_block_size"] == block


# -- movement pruning ----------------------------------------------------------------------------
def _backward(lin, grad: torch.Tensor) -> None:
    """One training backward whose gradient at ``lin.weight`` is ``grad`` (through the masks'
    gradient hook, as in training)."""
    lin.weight.grad = None
    (lin.weight * grad).sum().backward()


def _adam_scores(ds: list[torch.Tensor], lr: float, lam: float = 0.0, n: int = 1) -> torch.Tensor:
    """Float64 reference: Adam (betas 0.9/0.999, eps 1e-8) from S = 0 on the gradients
    ``d + lam / n * sigmoid'(S)``, one step per ``d``."""
    s = torch.zeros_like(ds[0], dtype=torch.float64)
    mom, vel = torch.zeros_like(s), torch.zeros_like(s)
    for k, d in enumerate(ds):
        sig = torch.sigmoid(s)
        d = d.double() + lam / n * sig * (1 - sig)
        mom = 0.9 * mom + 0.1 * d
        vel = 0.999 * vel + 0.001 * d * d
        s = s - lr * (mom / (1 - 0.9 ** (k + 1))) / ((vel / (1 - 0.999 ** (k + 1))).sqrt() + 1e-8)
    return s


def test_movement_pruned_weights_keep_scoring_and_come_back_with_their_values():
    """A weight pruned at one step keeps its value aside and its score keeps learning from
    value * g (g the gradient at its position, which the model's masked gradient hides); once
    its score is above a kept weight's, the next pruning step brings it back with that value and
    prunes the other. Weights pruned before the run stay pruned whatever their score."""
    from obert.pruning.driver import prune_model
    from obert.pruning.methods.movement import Movement

    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))  # the last: pruned before the run
    targets = find_targets(torch.nn.Sequential(lin), include=["0"])
    masks = MaskSet(targets, {targets[0].name: torch.tensor([[True, True, True, False]])}).attach()
    cfg = PruneConfig(0.5, method="movement", score_lr=0.01)
    m = Movement(cfg)
    m.on_train_begin(None, targets, masks)
    values, ds = torch.tensor([[1.0, 2.0, 3.0, 0.0]]), []
    for _ in range(2):  # weight 0 grows, 1 shrinks, 2 grows
        g = torch.tensor([[-1.0, 0.5, -0.1, 9.0]])
        _backward(lin, g)
        ds.append(values * g)
        m.on_gradients(None, targets, masks)
    masks, _ = prune_model(lin, targets, cfg, masks=masks, method=m, log=lambda s: None)
    assert masks.masks[targets[0].name].tolist() == [[True, False, True, False]]  # 1 pruned
    assert lin.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    for _ in range(6):  # the pruned weight 1 grows (its gradient only reaches the score), 2 shrinks
        g = torch.tensor([[0.0, -10.0, 2.0, 9.0]])
        _backward(lin, g)
        assert lin.weight.grad[0, 1] == 0  # the model's gradient is masked
        ds.append(values * g)
        m.on_gradients(None, targets, masks)
    got = m.scores(None, targets, masks, None, 0)[targets[0].name]
    torch.testing.assert_close(got.double(), _adam_scores(ds, 0.01).reshape(-1), rtol=1e-5, atol=1e-7)
    masks, _ = prune_model(lin, targets, cfg, masks=masks, method=m, log=lambda s: None)
    assert masks.masks[targets[0].name].tolist() == [[True, True, False, False]]
    assert lin.weight.tolist() == [[1.0, 2.0, 0.0, 0.0]]  # weight 1 back with its value
    resumed = Movement(cfg)  # what is aside survives a checkpoint
    resumed.load_state_dict(m.state_dict())
    resumed.on_train_begin(None, targets, masks)
    assert resumed.values(targets[0]).tolist() == [[1.0, 2.0, 3.0, 0.0]]
    assert resumed.regrowable(targets[0]).tolist() == [[False, False, True, False]]
    masks.detach()


@pytest.mark.parametrize("method,lam", [("movement", 0.0), ("soft-movement", 40.0)])
def test_movement_scores_follow_adam_on_the_straight_through_gradient(method, lam):
    """Hand-computed in float64: Adam on dL/dS = w g (+ lambda sigmoid'(S) / N for soft
    movement, N the number of target weights), g the step's gradient through the masks' hook;
    block4 scores are the sums over groups of 4; restored after two steps from its state_dict
    (scores and moments), it continues exactly as the uninterrupted run."""
    from obert.pruning.methods import METHODS

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 3, bias=False)
    targets = find_targets(torch.nn.Sequential(lin), include=["0"])
    masks = MaskSet(targets).attach()
    lr, n = 0.05, 24
    cfg = PruneConfig(0.5, method=method, structure="block4", score_lr=lr,
                      **({"regularization": lam} if lam else {}))
    weights = [torch.randn(3, 8) for _ in range(4)]
    grads = [torch.randn(3, 8) for _ in range(4)]

    def run(m, steps):
        for k in steps:
            with torch.no_grad():
                lin.weight.copy_(weights[k])
            _backward(lin, grads[k])
            m.on_gradients(None, targets, masks)
        return m

    full = METHODS[method](cfg)
    full.on_train_begin(None, targets, masks)
    with pytest.raises(ObertError, match="none has run yet"):
        full.scores(None, targets, masks, None, 0)
    got = run(full, range(4)).scores(None, targets, masks, None, 0)[targets[0].name]
    want = _adam_scores([w * g for w, g in zip(weights, grads)], lr, lam, n)
    torch.testing.assert_close(got.double(), want.reshape(-1, 4).sum(1), rtol=1e-5, atol=1e-6)

    first = METHODS[method](cfg)
    first.on_train_begin(None, targets, masks)
    saved = {k: v.clone() for k, v in run(first, range(2)).state_dict().items()}
    assert f"{targets[0].name}.exp_avg_sq" in saved
    resumed = METHODS[method](cfg)
    resumed.load_state_dict(saved)
    assert resumed.state_dict().keys() == saved.keys()
    resumed.on_train_begin(None, targets, masks)
    again = run(resumed, range(2, 4)).scores(None, targets, masks, None, 0)[targets[0].name]
    assert torch.equal(again, got)
    masks.detach()


def test_soft_movement_penalty_pulls_unused_scores_down():
    """With no task gradient the penalty alone drives every score down (lambda > 0), and with
    lambda = 0 they stay where they were."""
    from obert.pruning.methods.movement import SoftMovement

    lin = torch.nn.Linear(4, 2, bias=False)
    targets = find_targets(torch.nn.Sequential(lin), include=["0"])
    for lam, moves in ((10.0, True), (0.0, False)):
        m = SoftMovement(PruneConfig(0.5, method="soft-movement", regularization=lam))
        m.on_train_begin(None, targets, MaskSet(targets))
        for _ in range(3):
            lin.weight.grad = torch.zeros(2, 4)
            m.on_gradients(None, targets, MaskSet(targets))
        got = m.scores(None, targets, MaskSet(targets), None, 0)[targets[0].name]
        assert bool((got < 0).all()) if moves else bool((got == 0).all())


@pytest.mark.parametrize("method", ["movement", "soft-movement"])
def test_movement_is_gradual_only(tmp_path, tiny_model_dir, data_files, capsys, method):
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--method", method,
                 "--sparsity", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert f"{method} learns its scores while training" in capsys.readouterr().err
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__method=method,
                      pruning__start_epoch=0)
    with pytest.raises(ObertError, match="start pruning after some"):
        load_recipe(doc=doc)


@pytest.mark.parametrize("method", ["movement", "soft-movement"])
def test_movement_recipe_resumes_to_the_same_masks(tmp_path, data_files, tiny_model_dir, method):
    """Gradual movement pruning through a recipe; killed after a checkpoint and resumed (scores
    restored from the checkpoint), it ends with the masks of the uninterrupted run."""
    from conftest import Crashed, crash_at
    from safetensors.torch import load_file

    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    def recipe(name, structure):
        return load_recipe(doc=tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__method=method,
                                           pruning__structure=structure, output_dir=str(tmp_path / name)))

    full = recipe("full", "block4")
    run_recipe(full, progress=False)
    record = json.loads((tmp_path / "full" / "sparsity.json").read_text())
    assert record["method"] == method and record["global_sparsity"] == pytest.approx(0.8, abs=1e-3)
    cut = recipe("cut", "block4")
    with pytest.raises(Crashed):
        run_recipe(cut, progress=False, extra_callbacks=[crash_at(15)])
    run_recipe(cut, resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for k in a:
        if "encoder.layer" in k and k.endswith("weight") and a[k].dim() == 2:
            assert torch.equal(a[k] == 0, b[k] == 0), k
            groups = (a[k] == 0).reshape(a[k].shape[0], -1, 4)
            assert torch.all(groups.all(-1) | ~groups.any(-1))


# -- N:M semi-structured -------------------------------------------------------------------------
def kkt_prune(w, fisher, pruned):
    """Brute-force OBS: ``min 1/2 dw^T F dw`` subject to ``(w + dw)_P = 0``, by solving the KKT
    system of the explicit (float64) Fisher. Returns (cost, new weights)."""
    d = w.numel()
    p = pruned.nonzero().squeeze(1)
    e = torch.zeros(len(p), d, dtype=torch.float64)
    e[torch.arange(len(p)), p] = 1
    kkt = torch.zeros(d + len(p), d + len(p), dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = fisher, e.T, e
    rhs = torch.cat([torch.zeros(d, dtype=torch.float64), -w[p]])
    dw = torch.linalg.solve(kkt, rhs)[:d]
    return float(0.5 * dw @ fisher @ dw), w + dw


def test_nm_patterns():
    from math import comb

    from obert.core.obs import nm_patterns

    for m, k in [(4, 2), (8, 4), (4, 0), (8, 1)]:
        p = nm_patterns(m, k)
        assert p.shape == (comb(m, k), m) and bool((p.sum(1) == k).all())
        assert len({tuple(r.tolist()) for r in p}) == comb(m, k)


@pytest.mark.parametrize("m,k", [(4, 2), (8, 4), (8, 3)])
def test_pattern_saliency_is_the_brute_force_obs_cost(m, k):
    from obert.core.obs import nm_patterns, pattern_saliency

    torch.manual_seed(m + k)
    groups = 5
    grads = torch.randn(groups, 20, m, dtype=torch.float64)
    fisher = 1e-2 * torch.eye(m, dtype=torch.float64) + grads.transpose(1, 2) @ grads / 20
    w = torch.randn(groups, m, dtype=torch.float64)
    patterns = nm_patterns(m, k)
    got = pattern_saliency(w, torch.linalg.inv(fisher), patterns, chunk=2)
    for gi in range(groups):
        for pi, pat in enumerate(patterns):
            cost, _ = kkt_prune(w[gi], fisher[gi], pat)
            assert float(got[gi, pi]) == pytest.approx(cost, rel=1e-8, abs=1e-12)


def _grads_and_fisher(model, targets, tmp_path, num_grads, block_size, damp):
    """The explicit per-block Fisher of every target from the gradients oBERT would take."""
    from conftest import reference_inverse

    from obert.pruning.fisher import batch_stream

    loaders = gradient_batches(encoded_rows(tmp_path, model), 8)
    rows = {t.name: [] for t in targets}
    model.eval()
    for batch in batch_stream(loaders, num_grads, 0):
        model.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            rows[t.name].append(t.module.weight.grad.reshape(-1).clone())
    return {t.name: torch.linalg.inv(reference_inverse(torch.stack(rows[t.name]), block_size, damp))
            for t in targets}


@pytest.mark.parametrize("method,block", [("obert", 4), ("obert", 16), ("mfac", 16)])
def test_nm_pruning_is_the_joint_obs_optimum(tmp_path, method, block):
    """2:4 one-shot: every group of 4 keeps exactly 2; with one group per Fisher block (B = 4) the
    pattern of each group is the brute-force best and the weights the constrained optimum; with
    B = 16 the weights are the joint optimum for the chosen patterns of each block."""
    from obert.pruning.driver import prune_model

    torch.manual_seed(0)
    model = tiny_model("bert").double()
    targets = find_targets(model)[:2]
    before = {t.name: t.module.weight.detach().clone().reshape(-1) for t in targets}
    fisher = _grads_and_fisher(model, targets, tmp_path, 6, block, 1e-3)
    cfg = PruneConfig(0.5, method=method, structure="2:4", grad_batch_size=8, num_grads=6,
                      fisher_block_size=block, damp=1e-3)
    prune_model(model, targets, cfg, gradient_batches(encoded_rows(tmp_path, model), 8),
                log=lambda s: None)
    from obert.core.obs import nm_patterns

    patterns = nm_patterns(4, 2)
    for t in targets:
        w = t.module.weight.detach().reshape(-1)
        zero = (w == 0).reshape(-1, 4)
        assert bool((zero.sum(1) == 2).all())
        for b in range(w.numel() // block):
            sl = slice(b * block, (b + 1) * block)
            f = fisher[t.name][b]
            if block == 4:  # the best pattern by brute force
                costs = [kkt_prune(before[t.name][sl], f, p)[0] for p in patterns]
                assert torch.equal(zero[b], patterns[int(torch.tensor(costs).argmin())])
            _, best = kkt_prune(before[t.name][sl], f, zero.reshape(-1)[sl])
            torch.testing.assert_close(w[sl], best, rtol=1e-6, atol=1e-8)


def test_nm_magnitude_keeps_the_largest_of_each_group_and_masks_grow(tmp_path):
    from obert.pruning.driver import prune_model

    torch.manual_seed(1)
    model = tiny_model("bert")
    targets = find_targets(model)
    w0 = {t.name: t.module.weight.detach().clone() for t in targets}
    masks, report = prune_model(model, targets, PruneConfig(0.25, method="magnitude", structure="4:8"),
                                log=lambda s: None)
    for t in targets:
        g = w0[t.name].reshape(-1, 8).abs()
        smallest = g.argsort(1)[:, :2]
        zero = (t.module.weight.reshape(-1, 8) == 0)
        assert bool(zero.gather(1, smallest).all()) and bool((zero.sum(1) == 2).all())
    masks, report = prune_model(model, targets, PruneConfig(0.5, method="magnitude", structure="4:8"),
                                masks=masks, log=lambda s: None)
    for t in targets:
        zero = (t.module.weight.reshape(-1, 8) == 0)
        assert bool((zero.sum(1) == 4).all())
        assert bool(zero.reshape(-1)[(w0[t.name].reshape(-1, 8).abs().argsort(1)[:, :2]
                                      + 8 * torch.arange(zero.shape[0])[:, None]).reshape(-1)].all())
    assert report.steps[-1]["sparsity"] == pytest.approx(0.5)


def test_nm_bad_sparsities_are_refused(tmp_path, tiny_model_dir, data_files, capsys):
    with pytest.raises(ObertError, match="2:4 keeps 2 of every 4 weights: sparsity at most 0.5"):
        PruneConfig(0.6, structure="2:4")
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--structure", "4:8",
                 "--method", "magnitude", "--sparsity", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "one of 0.125, 0.25, 0.375, 0.5" in capsys.readouterr().err
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__structure="2:4",
                      pruning__fisher_block_size=16)
    with pytest.raises(ObertError, match="final_sparsity: 2:4 keeps 2 of every 4 weights, so it must be 0.5"):
        load_recipe(doc=doc)
    with pytest.raises(ObertError, match="woodfisher prunes single weights"):
        PruneConfig(0.5, method="woodfisher", structure="2:4")


def test_nm_gradual_recipe_ends_2_of_4(tmp_path, data_files, tiny_model_dir):
    from safetensors.torch import load_file

    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__structure="2:4",
                      pruning__init_sparsity=0.25, pruning__final_sparsity=0.5,
                      pruning__fisher_block_size=16, training__epochs=3, pruning__end_epoch=2)
    run_recipe(load_recipe(doc=doc), progress=False)
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert [s["sparsity"] for s in record["steps"]] == pytest.approx([0.25, 0.5])
    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in w.items():
        if "encoder.layer" in k and k.endswith("weight") and v.dim() == 2:
            assert bool(((v == 0).reshape(-1, 4).sum(1) == 2).all()), k


# -- --damp auto -------------------------------------------------------------------------------
def test_auto_damping_is_one_lambda_in_units_of_the_mean_fisher_diagonal():
    """FisherResult.use_damping(r): every block inverted with lambda = r * mean(diag F) over all
    blocks of all targets, against explicit inverses."""
    from obert.core.obs import gram_blocks
    from obert.pruning.fisher import FisherResult

    torch.manual_seed(0)
    grads = {"a": torch.randn(6, 40, dtype=torch.float64), "b": 3 * torch.randn(6, 20, dtype=torch.float64)}
    grads["a"][:, 30:] = 0  # a block without gradient is damped like the others
    res = FisherResult(grams={n: gram_blocks(g, 10) for n, g in grads.items()}, num_grads=6)
    scale = float(torch.cat([g.square().mean(0) for g in grads.values()]).mean())
    assert res.fisher_scale() == pytest.approx(scale, rel=1e-12)
    res.use_damping(0.1)
    assert res.damping == 0.1 and res.damping_absolute == pytest.approx(0.1 * scale, rel=1e-12)
    for n, g in grads.items():
        for b in range(g.shape[1] // 10):
            f = g[:, 10 * b:10 * b + 10].T @ g[:, 10 * b:10 * b + 10] / 6
            ref = torch.linalg.inv(f + 0.1 * scale * torch.eye(10, dtype=torch.float64))
            torch.testing.assert_close(res.get(n)[b], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("criterion", ["kl", "loss"])
def test_damp_auto_picks_the_grid_minimiser(tmp_path, criterion):
    """One-shot oBERT with --damp auto: every damping of the grid is scored after its OBS update
    (kl: the divergence of the held-out predictions from the unpruned model's; loss: the task
    loss), recomputed here from explicit per-block inverses and explicit softmaxes; the lowest
    wins and the pruned weights are that candidate's."""
    from obert.core.obs import prune_update, saliency
    from obert.pruning.driver import heldout_loss, prune_model, select_groups
    from obert.pruning.fisher import batch_stream
    from obert.pruning.methods.obert import AUTO_GRID

    torch.manual_seed(0)
    model = tiny_model("bert").double()
    targets = find_targets(model)
    start = {t.name: t.module.weight.detach().clone() for t in targets}
    loaders = gradient_batches(encoded_rows(tmp_path, model), 8)
    grams = {t.name: torch.zeros(t.numel // 16, 16, 16, dtype=torch.float64) for t in targets}
    model.eval()
    for batch in batch_stream(loaders, 6, 0):
        model.zero_grad()
        model(**batch).loss.backward()
        for t in targets:
            g = t.module.weight.grad.reshape(-1, 16)
            grams[t.name] += g.unsqueeze(-1) * g.unsqueeze(-2)
    heldout = list(batch_stream(loaders, 3, 104_729))

    def log_probs():
        with torch.no_grad():
            return torch.cat([torch.log_softmax(model(**b).logits, -1) for b in heldout])

    model.eval()
    reference = log_probs()
    expect, weights = {}, {}
    scale = sum(float(g.diagonal(dim1=-2, dim2=-1).sum()) for g in grams.values()) / 6 / \
        sum(t.numel for t in targets)
    for r in AUTO_GRID:
        finv = {}
        for t in targets:
            f = grams[t.name] / 6
            finv[t.name] = torch.linalg.inv(f + r * scale * torch.eye(16, dtype=torch.float64))
        scores = {t.name: saliency(start[t.name], finv[t.name]) for t in targets}
        chosen = select_groups(scores, 0.6, "global")
        with torch.no_grad():
            for t in targets:
                t.module.weight.copy_(prune_update(start[t.name], finv[t.name],
                                                   chosen[t.name].reshape(t.module.weight.shape)))
        if criterion == "loss":
            expect[r] = heldout_loss(model, heldout)
        else:
            lp = log_probs()
            expect[r] = float((reference.exp() * (reference - lp)).sum(-1).mean())
        weights[r] = {t.name: t.module.weight.detach().clone() for t in targets}
        with torch.no_grad():
            for t in targets:
                t.module.weight.copy_(start[t.name])
    cfg = PruneConfig(0.6, grad_batch_size=8, num_grads=6, fisher_block_size=16, damp="auto",
                      auto_batches=3, auto_criterion=criterion)
    _, report = prune_model(model, targets, cfg, loaders, log=lambda s: None)
    step = report.steps[0]
    assert step["damping_criterion"] == criterion
    assert step["damping_absolute"] == pytest.approx(step["damping"] * scale, rel=1e-9)
    assert {float(k): v for k, v in step["damping_losses"].items()} == pytest.approx(expect, rel=1e-9)
    best = min(expect, key=expect.get)
    assert step["damping"] == best and len(set(expect.values())) > 1
    for t in targets:
        torch.testing.assert_close(t.module.weight.detach(), weights[best][t.name], rtol=1e-6, atol=1e-9)


def test_divergence_rows_per_task_output():
    """output_log_probs keeps one distribution per labelled token (masked LM: labels -100
    elsewhere), per example (classification), and per example for each of QA's start/end logits;
    divergence is the mean KL over those rows, against explicit sums."""
    from obert.pruning.driver import divergence, output_log_probs

    class Fixed(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.out = out

        def forward(self, **batch):
            return {k: v + 0 * self.p for k, v in self.out.items()}

    torch.manual_seed(0)
    mlm = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 2, 5, 0
    got = output_log_probs(Fixed({"logits": mlm}), [{"labels": labels}])
    assert got[0][0].shape == (3, 7)
    torch.testing.assert_close(got[0][0], torch.log_softmax(mlm[labels != -100], -1))
    qa = {"start_logits": torch.randn(3, 9), "end_logits": torch.randn(3, 9), "loss": torch.tensor(1.0)}
    got_qa = output_log_probs(Fixed(qa), [{"start_positions": torch.zeros(3, dtype=torch.long)}])
    assert [t.shape for t in got_qa[0]] == [(3, 9), (3, 9)]  # end, start: sorted by name
    other = {k: v + torch.randn_like(v) for k, v in qa.items() if k != "loss"}
    got_other = output_log_probs(Fixed(other), [{}])
    expect = sum(float((torch.softmax(qa[k], -1) * (torch.log_softmax(qa[k], -1)
                        - torch.log_softmax(other[k], -1))).sum()) for k in ("start_logits", "end_logits")) / 6
    assert divergence(got_qa, got_other) == pytest.approx(expect, rel=1e-5)
    assert divergence(got_qa, got_qa) == 0.0


def test_damp_auto_through_the_cli_and_a_recipe(tmp_path, tiny_model_dir, data_files, capsys):
    out = tmp_path / "auto"
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--damp", "auto",
                 "--sparsity", "0.5", "--num-grads", "8", "--grad-batch-size", "8",
                 "--fisher-block-size", "16", "--max-length", "16", "--out", str(out)]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["settings"]["damp"] == "auto" and record["steps"][0]["damping"] > 0
    capsys.readouterr()
    assert main(["prune", tiny_model_dir, "--train-file", data_files[0], "--damp", "often",
                 "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: --damp must be a positive number or auto, got 'often'"
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__damp="auto", training__epochs=3,
                      pruning__end_epoch=2)
    run_recipe(load_recipe(doc=doc), progress=False)
    steps = json.loads((tmp_path / "out" / "sparsity.json").read_text())["steps"]
    from obert.pruning.methods.obert import AUTO_GRID

    assert len(steps) == 2 and all(s["damping"] in AUTO_GRID for s in steps)


def test_prune_sweep_closes_each_estimate_after_its_last_config(tmp_path, monkeypatch):
    """A sweep shares one estimate per settings key and closes it once no later config needs it
    (M-FAC's estimates hold gigabytes on disk), not at the end of the sweep."""
    from obert.pruning.paged import PagedMFAC
    from obert.training.oneshot import prune_sweep

    closed = []
    original = PagedMFAC.close
    monkeypatch.setattr(PagedMFAC, "close", lambda self: (closed.append(self.num_grads), original(self)))
    model = tiny_model("bert")
    configs = [PruneConfig(s, method="mfac", num_grads=m, grad_batch_size=8, fisher_block_size=256)
               for s, m in ((0.3, 4), (0.5, 4), (0.5, 6))]
    loaders = lambda bs: gradient_batches(encoded_rows(tmp_path, model), bs)  # noqa: E731
    seen = []
    for config, _, masks, _, _ in prune_sweep(model, configs, loaders, log=lambda s: None):
        seen.append((config.options.num_grads, list(closed)))
    assert seen == [(4, []), (4, []), (6, [4])] and closed == [4, 6]
