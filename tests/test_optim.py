"""MFACOptimizer against an explicit float64 inverse of the windowed Fisher; in recipes and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Crashed, crash_at, reference_inverse, tiny_recipe
from safetensors.torch import load_file

from obert import MFACOptimizer
from obert.errors import ObertError


@pytest.mark.parametrize("m,damp,momentum", [(1, 1e-2, 0.0), (3, 1e-3, 0.0), (4, 1e-4, 0.5)])
def test_steps_match_explicit_windowed_inverse(m, damp, momentum):
    """Every step moves the parameters by ``-lr_group * u`` (after decoupled decay), ``u`` the
    explicit ``(damp I + (1/m) sum_{last m} g g^T)^-1 g`` (plus momentum) over all parameters."""
    torch.manual_seed(m)
    a = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    lrs, wds = (0.1, 0.02), (0.3, 0.0)
    opt = MFACOptimizer([{"params": [a], "lr": lrs[0], "weight_decay": wds[0]},
                         {"params": [b], "lr": lrs[1], "weight_decay": wds[1]}],
                        num_grads=m, damp=damp, momentum=momentum)
    history, buf = [], None
    for _ in range(2 * m + 3):
        ga, gb = torch.randn_like(a), torch.randn_like(b)
        a.grad, b.grad = ga, gb
        g = torch.cat([ga.reshape(-1), gb])
        history.append(g)
        window = torch.stack(history[-m:])
        window = torch.cat([window, torch.zeros(m - window.shape[0], g.numel(), dtype=torch.float64)])
        u = reference_inverse(window, g.numel(), damp)[0] @ g
        buf = u if buf is None or not momentum else momentum * buf + u
        expect_a = a.detach() * (1 - lrs[0] * wds[0]) - lrs[0] * buf[:12].reshape(3, 4)
        expect_b = b.detach() * (1 - lrs[1] * wds[1]) - lrs[1] * buf[12:]
        opt.step()
        scale = float(buf.abs().max())
        torch.testing.assert_close(a.detach(), expect_a, rtol=1e-9, atol=1e-9 * scale)
        torch.testing.assert_close(b.detach(), expect_b, rtol=1e-9, atol=1e-9 * scale)


def test_state_dict_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.randn(20))
        return p, MFACOptimizer([p], lr=0.05, num_grads=4, damp=1e-3, momentum=0.9)

    p1, o1 = make()
    grads = [torch.randn(20) for _ in range(9)]
    for g in grads[:6]:
        p1.grad = g.clone()
        o1.step()
    torch.save(o1.state_dict(), tmp_path / "opt.pt")
    p2, o2 = make()
    with torch.no_grad():
        p2.copy_(p1)
    o2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for g in grads[6:]:
        for p, o in ((p1, o1), (p2, o2)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(p1, p2)


def test_memory_is_checked_before_the_window_is_allocated(monkeypatch):
    import obert.training.optim as optim

    monkeypatch.setattr(optim, "available_memory", lambda device: 10_000)
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    with pytest.raises(ObertError, match="M-FAC window of 8 gradients of 1,000 parameters.*num_grads"):
        MFACOptimizer([p], num_grads=8).step()


def test_bad_settings_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(Exception, match="num_grads"):
        MFACOptimizer([p], num_grads=0)
    with pytest.raises(ObertError, match="lr"):
        MFACOptimizer([p], lr=0.0)


def _trained(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def test_recipe_optimizer_mfac_trains_and_resumes(tmp_path, data_files, tiny_model_dir):
    """``training.optimizer: mfac`` through the Trainer (dense fine-tuning): the weights move, and
    a run killed mid-way and resumed (window and momentum in the checkpoint) ends identical."""
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    mfac = {"optimizer": "mfac", "mfac": {"num_grads": 4, "damp": 1e-3, "momentum": 0.5}}

    def recipe(name):
        doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning=None, distillation=None,
                          output_dir=str(tmp_path / name))
        doc["training"].update(mfac, lr=1e-4, epochs=3)
        return load_recipe(doc=doc)

    full = recipe("full")
    run_recipe(full, progress=False)
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    end = _trained(Path(full.output_dir))
    moved = [k for k in start if "encoder" in k and not torch.equal(start[k], end[k])]
    assert moved and all(torch.isfinite(v).all() for v in end.values())
    cut = recipe("cut")
    with pytest.raises(Crashed):
        run_recipe(cut, progress=False, extra_callbacks=[crash_at(9)])
    run_recipe(cut, resume=True, progress=False)
    again = _trained(Path(cut.output_dir))
    assert all(torch.equal(end[k], again[k]) for k in end)
    metrics = [json.loads((Path(r.output_dir) / "metrics.json").read_text()) for r in (full, cut)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]


def test_recipe_mfac_settings_need_the_mfac_optimizer(tmp_path, data_files, tiny_model_dir):
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir)
    doc["training"]["mfac"] = {"num_grads": 4}
    with pytest.raises(ObertError, match="training.mfac holds the settings of training.optimizer: mfac"):
        load_recipe(doc=doc)
    doc["training"].update(optimizer="mfac", mfac={"num_grads": 0})
    with pytest.raises(ObertError, match="training.mfac.num_grads"):
        load_recipe(doc=doc)
