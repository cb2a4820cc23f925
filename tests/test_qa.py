"""Question answering: windows and answer positions, span post-processing, SQuAD F1/EM, a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_tokenizer, tiny_qa_recipe
from obert.tasks.qa import (QAData, best_answers, eval_features, f1_score, normalize_answer,
                      squad_metrics, train_features)

CONTEXT = "alpha beta gamma delta red green blue cyan magenta yellow black white omega psi chi"


def example(answer: str = "blue cyan") -> QAData:
    start = CONTEXT.index(answer)
    return QAData(["q1"], ["what is gamma"], [CONTEXT],
                  [{"text": [answer], "answer_start": [start]}])


def test_train_windows_point_at_the_answer(tmp_path):
    tok = make_tokenizer(tmp_path)
    data = example("yellow black")
    feats = train_features(data, tok, max_length=14, doc_stride=4)
    assert len(feats) > 1  # the context is split into overlapping windows
    enc = eval_features(data, tok, max_length=14, doc_stride=4)
    found = 0
    for f, offsets in zip(feats, enc.offsets):
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0
            continue
        found += 1
        assert CONTEXT[offsets[s][0]:offsets[e][1]] == "yellow black"
    assert found >= 1


def test_best_answer_is_the_best_valid_span(tmp_path):
    tok = make_tokenizer(tmp_path)
    data = example()
    feats = eval_features(data, tok, max_length=64, doc_stride=16)
    offsets = feats.offsets[0]
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    n = len(offsets)
    start, end = np.zeros(n), np.zeros(n)
    blue, cyan = ctx[6], ctx[7]
    start[blue], end[cyan] = 5.0, 5.0
    start[1] = end[1] = 50.0  # a question token: never an answer
    end[ctx[2]] = 9.0  # the best end comes before the best start: invalid pair
    start[ctx[10]] = 4.0
    preds = best_answers(data, feats, [start], [end])
    assert preds == {"q1": "blue cyan"}
    # One-token answers only: the best is "gamma" (start 0 + end 9 beats 5 + 0 at blue or cyan).
    preds = best_answers(data, feats, [start], [end], max_answer_length=1)
    assert preds == {"q1": "gamma"}


def test_squad_metrics_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert f1_score("capital paris", "Paris") == pytest.approx(2 / 3)
    data = QAData(["a", "b"], ["", ""], ["", ""],
                  [{"text": ["Paris", "the city of Paris"], "answer_start": [0, 0]},
                   {"text": ["blue"], "answer_start": [0]}])
    m = squad_metrics({"a": "the Paris", "b": "red green"}, data)
    assert m == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(50.0)}
    m = squad_metrics({"a": "city of Paris today", "b": "blue"}, data)
    # a: best gold "the city of Paris" -> tokens city/of/paris vs city/of/paris/today: P=3/4, R=1
    assert m["f1"] == pytest.approx(100 * (2 * 0.75 / 1.75 + 1) / 2)
    assert m["exact_match"] == pytest.approx(50.0)


def test_gradual_qa_run(tmp_path):
    from obert.training.gradual import run_recipe
    from obert.training.recipe import load_recipe

    doc = tiny_qa_recipe(tmp_path)
    metrics = run_recipe(load_recipe(doc=doc), progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 <= saved["f1"] <= 100.0 and 0.0 <= saved["exact_match"] <= saved["f1"] + 1e-9
    assert saved["global_sparsity"] == pytest.approx(0.6, abs=1e-3) and metrics["metric"] == "f1"


def test_load_qa_formats(tmp_path, monkeypatch):
    from obert.errors import ObertError
    from obert.tasks.qa import load_qa

    official = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": [{"id": "x1", "question": "what", "answers": [
            {"text": "blue", "answer_start": CONTEXT.index("blue")}]}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(official))
    data = load_qa(str(tmp_path / "dev.json"))
    assert data.ids == ["x1"] and data.answers[0] == {"text": ["blue"], "answer_start": [CONTEXT.index("blue")]}

    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"id": "s1", "title": "t", "context": CONTEXT,
                                            "question": "q", "answers": {"text": ["red"], "answer_start": [18]}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_qa(task="squad", split="eval").ids == ["s1"] and calls == [("squad", "validation")]
    (tmp_path / "bad.jsonl").write_text('{"id": "1", "question": "q"}\n')
    with pytest.raises(ObertError, match="missing context, answers"):
        load_qa(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ObertError, match="unknown question-answering task"):
        load_qa(task="hotpot")


def test_qa_block4_qat_stage_compiles_to_the_same_start_and_end_logits(tmp_path):
    """A question-answering model pruned in blocks of 4 and trained quantisation-aware, then
    compiled int8 by a compile stage: the compiled model computes the evaluated model's start
    and end logits; its QDQ ONNX export has both outputs and computes them too."""
    import onnx
    import torch
    from transformers import AutoModelForQuestionAnswering

    from obert.cli.main import main
    from obert.runtime import load_compiled
    from obert.runtime.fake_quant import fake_quantize, remove
    from obert.runtime.onnx_export import check_onnx
    from obert.training.stages import load_staged, run_stages

    doc = tiny_qa_recipe(tmp_path)
    train = {k: doc[k] for k in ("model", "data", "training", "pruning", "distillation")}
    train["pruning"]["structure"] = "block4"
    train["quantization"] = {"start_epoch": 1}
    staged = load_staged(None, doc={"output_dir": str(tmp_path / "run"), "stages": [
        {"name": "prune", **train}, {"name": "compile", "compile": {"dtype": "int8"}}]})
    run_stages(staged, resume=False, overwrite=False, progress=False, log=lambda s: None)
    trained_dir, compiled_dir = (tmp_path / "run" / "01-prune", tmp_path / "run" / "02-compile")
    layers = json.loads((trained_dir / "quantization.json").read_text())["layers"]
    runtime = json.loads((compiled_dir / "obert_runtime.json").read_text())
    assert layers and sum(spec["int8"] for spec in runtime["layers"].values()) == len(layers)

    qat = AutoModelForQuestionAnswering.from_pretrained(trained_dir).eval()
    compiled = load_compiled(compiled_dir)
    ids = torch.randint(5, qat.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    with torch.no_grad():
        fake_quantize(qat, layers)  # what the QAT run evaluated
        want = qat(input_ids=ids, attention_mask=mask)
        remove(qat)
        got = compiled(input_ids=ids, attention_mask=mask)
    for name in ("start_logits", "end_logits"):
        w, g = getattr(want, name), getattr(got, name)
        assert float((g - w).abs().max()) < 1e-4 * max(1.0, float(w.abs().max())), name

    onnx_path = tmp_path / "qa.onnx"
    assert main(["export", str(trained_dir), "--out", str(onnx_path)]) == 0
    assert [o.name for o in onnx.load(str(onnx_path)).graph.output] == ["start_logits", "end_logits"]
    assert check_onnx(qat, onnx_path, int8_layers=layers) < 1e-4 * max(
        1.0, float(want.start_logits.abs().max()), float(want.end_logits.abs().max()))
