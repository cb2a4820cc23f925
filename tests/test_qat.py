"""Quantisation-aware training to the runtime's int8 scheme: fake quantisation against the
kernels' arithmetic, zeros kept, weights baked onto the grid, and compile(int8) of the result
computing what the fake-quantised model computes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import block4_pruned_dir, tiny_recipe

from obert.core.quantize import row_scales
from obert.runtime.linear import quantize_tokens
from obert.runtime.fake_quant import bake, fake_quant_tokens, fake_quant_weight, fake_quantize, remove


def test_fake_quant_weight_is_the_row_grid_with_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    w[:, 4:8] = 0  # a pruned block
    w.requires_grad_(True)
    q = fake_quant_weight(w)
    s = w.detach().abs().amax(1) / 127
    levels = q.detach() / s[:, None]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert float(levels.abs().max()) <= 127 + 1e-4
    assert bool((q.detach()[:, 4:8] == 0).all())  # zeros stay exactly zero
    # Reference: round to nearest on the float64 grid.
    ref = (w.detach().double() / s.double()[:, None]).round() * s.double()[:, None]
    torch.testing.assert_close(q.detach().double(), ref, rtol=0, atol=1e-6)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through


def test_fake_quant_tokens_is_the_kernels_quantisation():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = fake_quant_tokens(x)
    torch.testing.assert_close(y.detach(), quantize_tokens(x.detach().reshape(10, 12)).reshape(2, 5, 12),
                               rtol=0, atol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_and_remove_and_bake():
    lin = torch.nn.Linear(8, 4)
    model = torch.nn.Sequential(lin)
    x = torch.randn(3, 8)
    plain = model(x)
    fake_quantize(model, ["0"])
    fq = model(x)
    want = torch.nn.functional.linear(quantize_tokens(x), fake_quant_weight(lin.weight).detach(), lin.bias)
    torch.testing.assert_close(fq, want)
    remove(model)
    torch.testing.assert_close(model(x), plain)
    bake(model, ["0"])
    s = row_scales(lin.weight.detach())
    levels = lin.weight.detach() / s[:, None]
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_qat_run_keeps_zeros_bakes_the_grid_and_compiles_to_the_same_logits(
        tmp_path, data_files, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from obert import find_targets
    from obert.runtime import compile as compile_runtime
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    src, before = block4_pruned_dir(tiny_model_dir, tmp_path / "b4", sparsity=0.7)
    zeros = {t.name: t.module.weight == 0 for t in find_targets(before)}
    doc = tiny_recipe(tmp_path, data_files, str(src), pruning=None, distillation=None,
                      training__epochs=2, quantization={"start_epoch": 1})
    run_recipe(load_recipe(doc=doc), progress=False)
    out = tmp_path / "out"
    record = json.loads((out / "quantization.json").read_text())
    assert sorted(record["layers"]) == sorted(zeros)  # every block4 target is int8
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    for t in find_targets(model):
        w = t.module.weight.detach()
        assert bool((w[zeros[t.name]] == 0).all()), t.name  # the mask held through QAT
        # (a kept weight below half a grid step rounds to 0 too: rarely, and only those)
        assert float((w == 0).float().mean()) - float(zeros[t.name].float().mean()) < 0.05, t.name
        levels = w / row_scales(w)[:, None]
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)  # on the grid

    ids = torch.randint(5, model.config.vocab_size, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        fake_quantize(model, record["layers"])
        trained = model(input_ids=ids, attention_mask=mask).logits  # what QAT evaluated
        remove(model)
        report = compile_runtime(model, dtype="int8", choose="sparsity")
        assert sorted(n for n, k in report.kinds.items() if k == "int8") == sorted(record["layers"])
        compiled = model(input_ids=ids, attention_mask=mask).logits
    err = float((compiled - trained).abs().max())
    assert err < 1e-4 * max(1.0, float(trained.abs().max())), err
    # The input quantisation matters: without it the model computes something else.
    assert float((plain - trained).abs().max()) > 10 * err
    # QDQ ONNX: int8 weights behind DequantizeLinear, the same function in ONNX Runtime.
    import onnx
    from onnx import numpy_helper

    from obert.runtime.onnx_export import check_onnx, export_qdq

    qat = AutoModelForSequenceClassification.from_pretrained(out).eval()
    onnx_path = export_qdq(qat, tmp_path / "qdq.onnx", record["layers"])
    graph = onnx.load(str(onnx_path)).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == len(record["layers"])
    assert sum(numpy_helper.to_array(i).dtype == "int8" and i.name.endswith("_int8")
               for i in graph.initializer) == len(record["layers"])
    same = check_onnx(qat, onnx_path, int8_layers=record["layers"])
    other = check_onnx(qat, onnx_path)  # against the float model
    assert same < 1e-4 * max(1.0, float(trained.abs().max())) and same < other / 10
    from obert.cli.main import main

    assert main(["export", str(out), "--out", str(tmp_path / "cli.onnx")]) == 0
    assert sum(n.op_type == "DequantizeLinear"
               for n in onnx.load(str(tmp_path / "cli.onnx")).graph.node) == len(record["layers"])
    assert main(["export", str(out), "--out", str(tmp_path / "x.txt")]) == 2  # not .onnx
    # Calibration would move weights that are on the grid already: refused.
    assert main(["compile", str(out), "--dtype", "int8", "--calibration-file", data_files[0],
                 "--out", str(tmp_path / "c")]) == 2


def test_quantization_section_is_checked(tmp_path, data_files, tiny_model_dir):
    from obert.errors import ObertError
    from obert.training.recipe import load_recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, quantization={"start_epoch": 3})
    with pytest.raises(ObertError, match="pruning.structure: block4"):
        load_recipe(doc=doc)
    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning__structure="block4",
                      quantization={"start_epoch": 2})
    with pytest.raises(ObertError, match=r"must not come before pruning.end_epoch \(3\)"):
        load_recipe(doc=doc)
    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir, pruning=None, quantization={"start_epoch": 4})
    with pytest.raises(ObertError, match="must come before the end of training"):
        load_recipe(doc=doc)


def test_quantization_of_a_model_without_int8_layers_is_refused_before_training(
        tmp_path, data_files, tiny_model_dir):
    from obert.errors import ObertError
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    # Unstructured zeros: no layer is dense or pruned in whole blocks of 4.
    unstructured, _ = block4_pruned_dir(tiny_model_dir, tmp_path / "unstructured", group=1)
    doc = tiny_recipe(tmp_path, data_files, str(unstructured), pruning=None, distillation=None,
                      quantization={"start_epoch": 1})
    with pytest.raises(ObertError, match="has no layer the int8 kernels take"):
        run_recipe(load_recipe(doc=doc), progress=False)
    assert not (tmp_path / "out").exists()


def test_locked_transfer_with_qat_resumes_mid_quantisation_to_the_same_model(
        tmp_path, data_files, tiny_model_dir):
    """Sparse transfer (mask locked) with QAT from epoch 1, killed in the quantised phase and
    resumed from a checkpoint taken during it: the same zeros, weights and metrics as a run
    that was never killed."""
    from transformers import AutoModelForSequenceClassification

    from conftest import Crashed, crash_at
    from obert import find_targets
    from obert.training.gradual import checkpoint_dir, run_recipe
    from obert.training.recipe import load_recipe

    src, before = block4_pruned_dir(tiny_model_dir, tmp_path / "b4", sparsity=0.7)
    zeros = {t.name: t.module.weight == 0 for t in find_targets(before)}

    def recipe(name):
        return load_recipe(doc=tiny_recipe(
            tmp_path, data_files, str(src), pruning=None, training__epochs=2,
            training__save_every_epochs=0.5, quantization={"start_epoch": 1},
            distillation={"teacher": tiny_model_dir, "hardness": 0.5, "temperature": 2.0},
            output_dir=str(tmp_path / name)))

    run_recipe(recipe("full"), progress=False)
    cut = recipe("cut")
    with pytest.raises(Crashed):  # 6 steps per epoch: QAT from step 6, checkpoint at step 9
        run_recipe(cut, progress=False, extra_callbacks=[crash_at(10)])
    assert (checkpoint_dir(cut) / "checkpoint-9" / "obert_complete").is_file()
    run_recipe(cut, resume=True, progress=False)
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full")
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut")
    for ta, tb in zip(find_targets(a), find_targets(b)):
        wa, wb = ta.module.weight.detach(), tb.module.weight.detach()
        assert bool((wb[zeros[tb.name]] == 0).all()), tb.name  # the lock held across the kill
        torch.testing.assert_close(wb, wa, rtol=0, atol=1e-6)
        levels = wb / row_scales(wb)[:, None]
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)  # on the grid
    ma, mb = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("full", "cut"))
    assert ma["accuracy"] == mb["accuracy"] and ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert json.loads((tmp_path / "cut" / "quantization.json").read_text())["layers"] == \
        json.loads((tmp_path / "full" / "quantization.json").read_text())["layers"]


def test_compile_takes_the_trained_int8_layers_whatever_their_zeros(tiny_model_dir):
    """Weights on the int8 grid of rows with an outlier round many small weights to zero, which
    breaks the blocks of 4; compile still quantises the layers QAT trained (``trained_int8``) and
    computes what the fake-quantised model computes."""
    from transformers import AutoModelForSequenceClassification

    from obert import find_targets
    from obert.runtime import compile as compile_runtime
    from obert.runtime.linear import is_block4

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    names = [t.name for t in find_targets(model)]
    with torch.no_grad():
        for t in find_targets(model):
            t.module.weight[:, 0] = 40 * t.module.weight.abs().max()  # an outlier per row
        bake(model, names)
    assert not any(is_block4(t.module.weight) for t in find_targets(model))
    ids = torch.randint(5, model.config.vocab_size, (3, 10))
    with torch.no_grad():
        fake_quantize(model, names)
        want = model(input_ids=ids).logits
        remove(model)
        import copy

        untrained = copy.deepcopy(model)
        assert not compile_runtime(untrained, dtype="int8", choose="sparsity").int8_layers
        report = compile_runtime(model, dtype="int8", choose="sparsity", trained_int8=names)
        assert sorted(report.int8_layers) == sorted(names)
        got = model(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
