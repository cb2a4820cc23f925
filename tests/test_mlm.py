"""Masked-LM task (upstream pruning): text loading, blocks, masking, evaluation, token KD, and
an upstream-pruned model transferred to classification with its mask locked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_rows, make_tokenizer, tiny_config

from obert.errors import ObertError
from obert.tasks.mlm import (MLM_PROBABILITY, TokenBlocks, evaluate, fixed_masking, group_blocks,
                             load_texts, mlm_collator)


def test_group_blocks():
    assert group_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert group_blocks([[1, 2], [3]], 8) == [[1, 2, 3]]  # all there is: one short block
    assert group_blocks([], 4) == []


def test_load_texts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n  second doc  \n")
    assert load_texts(txt) == ["first doc", "second doc"]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "x y", "label": 3}\n{"text": "z", "label": 1}\n')
    assert load_texts(jl) == ["x y", "z"]  # labels ignored
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ObertError, match="no 'text' column"):
        load_texts(tmp_path / "b.jsonl")
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(ObertError, match="no text"):
        load_texts(tmp_path / "e.txt")
    with pytest.raises(ObertError, match="unsupported text file type '.md'"):
        (tmp_path / "c.md").write_text("x")
        load_texts(tmp_path / "c.md")


def _blocks(tmp_path, n=200, max_length=32):
    tok = make_tokenizer(tmp_path)
    texts = [r["text"] for r in make_rows(n, 0)]
    return tok, TokenBlocks(texts, tok, max_length)


def test_masking_rate_specials_and_labels(tmp_path):
    tok, data = _blocks(tmp_path)
    assert all(len(b) == 32 for b in data.blocks)
    collator = mlm_collator(tok)
    torch.manual_seed(0)
    batch = collator([data[i] for i in range(len(data))])
    original = torch.tensor(data.blocks)
    labels, ids = batch["labels"], batch["input_ids"]
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    masked = labels != -100
    assert not bool((masked & special).any())  # [CLS]/[SEP] never masked
    assert torch.equal(labels[masked], original[masked])  # labels are the original tokens
    assert torch.equal(ids[~masked], original[~masked])  # the rest is untouched
    rate = float(masked.sum()) / float((~special).sum())
    assert abs(rate - MLM_PROBABILITY) < 0.03, rate
    as_mask = float((ids[masked] == tok.mask_token_id).sum()) / float(masked.sum())
    assert abs(as_mask - 0.8) < 0.08, as_mask


def test_fixed_masking_is_repeatable_and_keeps_the_callers_random_state(tmp_path):
    tok, data = _blocks(tmp_path, n=60)
    collator = mlm_collator(tok)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = fixed_masking(data, collator, 4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = fixed_masking(data, collator, 4, seed=7)
    c = fixed_masking(data, collator, 4, seed=8)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, c))


def test_evaluate_against_a_float64_loop(tmp_path):
    from transformers import BertForMaskedLM

    tok, data = _blocks(tmp_path, n=60, max_length=16)
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config("bert")).eval()
    batches = fixed_masking(data, mlm_collator(tok), 5, seed=1)
    got = evaluate(model, batches, progress=False)
    correct = n = 0
    nll = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for row in range(logits.shape[0]):
                for pos in range(logits.shape[1]):
                    y = int(batch["labels"][row, pos])
                    if y == -100:
                        continue
                    z = logits[row, pos].double()
                    nll -= float(z[y] - torch.logsumexp(z, 0))
                    correct += int(int(z.argmax()) == y)
                    n += 1
    assert got["num_tokens"] == n
    assert got["accuracy"] == pytest.approx(correct / n)
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_token_kd_averages_over_real_tokens_only():
    from obert.training.distill import kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    T = 2.0
    terms = []
    for b in range(2):
        for p in range(5):
            if mask[b, p]:
                ps = torch.softmax(s[b, p] / T, 0)
                pt = torch.softmax(t[b, p] / T, 0)
                terms.append(float((pt * (pt / ps).log()).sum()))
    # (float32 inside kd_loss, as in training)
    assert float(kd_loss(s, t, T, mask)) == pytest.approx(T * T * sum(terms) / len(terms), rel=1e-6)
    # Changing padded positions changes nothing.
    s2 = s.clone()
    s2[1, 3:] += 5.0
    assert float(kd_loss(s2, t, T, mask)) == pytest.approx(float(kd_loss(s, t, T, mask)), rel=1e-12)


@pytest.fixture
def mlm_dir(tmp_path):
    from transformers import BertForMaskedLM

    out = tmp_path / "tiny-mlm"
    torch.manual_seed(0)
    BertForMaskedLM(tiny_config("bert")).save_pretrained(out)
    make_tokenizer(tmp_path).save_pretrained(out)
    return out


def _corpus(tmp_path) -> tuple[str, str]:
    train, held = tmp_path / "corpus.txt", tmp_path / "held.txt"
    train.write_text("\n".join(r["text"] for r in make_rows(160, 5)) + "\n")
    held.write_text("\n".join(r["text"] for r in make_rows(40, 6)) + "\n")
    return str(train), str(held)


def test_upstream_pruning_then_sparse_transfer(tmp_path, mlm_dir, data_files):
    """Prune Once for All on the tiny model: gradual oBERT on the masked-LM objective with KD
    from the dense masked LM, then classification from the sparse checkpoint, mask locked."""
    import yaml
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from obert import find_targets
    from obert.cli.main import main

    train, held = _corpus(tmp_path)
    upstream = {
        "model": {"path": str(mlm_dir), "task_type": "masked-lm"},
        "data": {"train_file": train, "eval_file": held},
        "training": {"epochs": 2, "lr": 1e-3, "batch_size": 8, "max_length": 32, "seed": 0},
        "pruning": {"init_sparsity": 0.5, "final_sparsity": 0.8, "start_epoch": 0, "end_epoch": 1,
                    "frequency": 0.5, "num_grads": 8, "grad_batch_size": 4, "fisher_block_size": 16},
        "distillation": {"teacher": str(mlm_dir), "hardness": 1.0, "temperature": 2.0},
        "output_dir": str(tmp_path / "upstream"),
    }
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(upstream))
    assert main(["train", "--recipe", str(tmp_path / "up.yaml"), "--no-progress"]) == 0
    up = tmp_path / "upstream"
    record = json.loads((up / "sparsity.json").read_text())
    assert record["global_sparsity"] == pytest.approx(0.8, abs=1e-3) and record["method"] == "obert"
    metrics = json.loads((up / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["num_tokens"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    sparse_mlm = AutoModelForMaskedLM.from_pretrained(up)  # a masked LM, with its head
    assert type(sparse_mlm).__name__ == "BertForMaskedLM"
    zeros = {t.name.removeprefix("bert."): t.module.weight == 0 for t in find_targets(sparse_mlm)}

    transfer = {
        "model": {"path": str(up)},
        "data": {"train_file": data_files[0], "eval_file": data_files[1]},
        "training": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 16, "seed": 0},
        "output_dir": str(tmp_path / "transfer"),
    }
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump(transfer))
    assert main(["train", "--recipe", str(tmp_path / "tr.yaml"), "--no-progress"]) == 0
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "transfer")
    for t in find_targets(clf):
        assert torch.equal(t.module.weight == 0, zeros[t.name.removeprefix("bert.")]), t.name
    record = json.loads((tmp_path / "transfer" / "sparsity.json").read_text())
    source = json.loads((up / "sparsity.json").read_text())
    assert record["mask_locked_from"] == str(up) and record["method"] == "obert"
    assert {k.removeprefix("bert."): v for k, v in record["layers"].items()} == \
        {k.removeprefix("bert."): v for k, v in source["layers"].items()}


def test_masked_lm_teacher_needs_its_head(tmp_path, mlm_dir):
    from transformers import BertModel

    from obert.tasks.base import TaskInputs
    from obert.tasks.mlm import build_task

    bare = tmp_path / "bare"
    BertModel(tiny_config("bert")).save_pretrained(bare)
    make_tokenizer(tmp_path).save_pretrained(bare)
    train, held = _corpus(tmp_path)
    logged = []
    inputs = TaskInputs(model_path=str(bare), tokenizer=None, reinit_head=False, data_task=None,
                        train_file=train, eval_file=held, max_train_rows=None, max_eval_rows=None,
                        max_length=32, doc_stride=8, seed=0, eval_batch_size=8, progress=False,
                        log=logged.append)
    task = build_task(inputs)
    assert any("has no masked-LM head: a new one is trained" in m for m in logged)
    assert type(task.model).__name__ == "BertForMaskedLM"
    with pytest.raises(ObertError, match="has no masked-LM head: train one first"):
        task.load_teacher(str(bare))
    assert type(task.load_teacher(str(mlm_dir))).__name__ == "BertForMaskedLM"


def test_load_corpus_joins_corpora_and_picks_splits(monkeypatch):
    import datasets

    from obert.tasks.mlm import load_corpus

    seen = []

    def fake(name, config=None, split=None):
        seen.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{name} one", "  ", f"{name} two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_corpus("books+wiki:en", "train") == ["books one", "books two", "wiki one", "wiki two"]
    assert seen == [("books", None, "train"), ("wiki", "en", "train")]
    load_corpus("books", "eval")
    assert seen[-1] == ("books", None, "validation")


def test_a_corpus_without_validation_split_holds_documents_out(monkeypatch, mlm_dir):
    import datasets

    from obert.tasks.base import TaskInputs
    from obert.tasks.mlm import build_task

    docs = [r["text"] for r in make_rows(100, 3)]

    def fake(name, config=None, split=None):
        if split != "train":
            raise ValueError(f"Unknown split {split}")
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    logged = []
    inputs = TaskInputs(model_path=str(mlm_dir), tokenizer=None, reinit_head=False,
                        data_task="books", train_file=None, eval_file=None, max_train_rows=None,
                        max_eval_rows=20, max_length=16, doc_stride=8, seed=0, eval_batch_size=8,
                        progress=False, log=logged.append)
    task = build_task(inputs)
    assert any("the last 10 training documents are held out" in m for m in logged)
    assert task.evaluate(task.model)["num_tokens"] > 0


def test_a_text_file_without_eval_file_holds_its_last_documents_out(tmp_path, mlm_dir, data_files):
    from obert.tasks.base import TaskInputs
    from obert.tasks.mlm import build_task
    from obert.training.recipe import load_recipe

    rows = make_rows(100, 3)
    whole, head, tail = tmp_path / "all.jsonl", tmp_path / "head.txt", tmp_path / "tail.txt"
    whole.write_text("".join(json.dumps(r) + "\n" for r in rows))  # labels ignored
    head.write_text("".join(r["text"] + "\n" for r in rows[:-5]))
    tail.write_text("".join(r["text"] + "\n" for r in rows[-5:]))

    def task(train, held, logged):
        return build_task(TaskInputs(
            model_path=str(mlm_dir), tokenizer=None, reinit_head=False, data_task=None,
            train_file=str(train), eval_file=held and str(held), max_train_rows=None,
            max_eval_rows=5, max_length=16, doc_stride=8, seed=0, eval_batch_size=8,
            progress=False, log=logged.append))

    logged = []
    held_out = task(whole, None, logged)
    assert any("all.jsonl has no evaluation text: the last 5 training documents are held out" in m
               for m in logged)
    split = task(head, tail, [])
    assert len(held_out.train_dataset) == len(split.train_dataset)
    assert held_out.evaluate(held_out.model) == split.evaluate(split.model)
    # Only masked-LM holds text out: a classifier needs its evaluation file.
    doc = {"model": {"path": str(mlm_dir), "task_type": "masked-lm"},
           "data": {"train_file": str(whole)}, "training": {"epochs": 1, "lr": 1e-4, "batch_size": 8},
           "output_dir": str(tmp_path / "out")}
    load_recipe(doc=doc)
    doc["model"]["task_type"] = "classification"
    doc["data"]["train_file"] = data_files[0]
    with pytest.raises(ObertError, match="give data.task, or data.eval_file with data.train_file"):
        load_recipe(doc=doc)


def test_long_documents_fill_several_blocks(tmp_path):
    tok = make_tokenizer(tmp_path)
    words = " ".join(r["text"] for r in make_rows(30, 2))  # one long document
    n = len(tok(words)["input_ids"])
    data = TokenBlocks([words], tok, 16)
    assert n > 64 and len(data) == n // 16  # every whole block of the document, none cut off
    assert [t for b in data.blocks for t in b] == tok(words)["input_ids"][: 16 * (n // 16)]


def test_masked_token_kd_against_a_float64_loop():
    from obert.training.distill import masked_token_distillation_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, -100, 1, -100], [6, -100, -100, -100, 2]])
    T = 2.0
    terms = []
    for b in range(2):
        for p in range(5):
            if labels[b, p] != -100:
                ps, pt = torch.softmax(s[b, p] / T, 0), torch.softmax(t[b, p] / T, 0)
                terms.append(float((pt * (pt / ps).log()).sum()))
    want = T * T * sum(terms) / len(terms)
    assert float(masked_token_distillation_loss(None, s, t, labels, 1.0, T)) == pytest.approx(want, rel=1e-6)
    keep = labels != -100  # logits of the masked tokens alone give the same
    assert float(masked_token_distillation_loss(None, s[keep], t[keep], labels, 1.0, T)) == \
        pytest.approx(want, rel=1e-6)
    mixed = masked_token_distillation_loss(torch.tensor(3.0), s, t, labels, 0.25, T)
    assert float(mixed) == pytest.approx(0.75 * 3.0 + 0.25 * want, rel=1e-6)


def test_trainer_distils_at_the_masked_tokens_only(tmp_path):
    from transformers import BertForMaskedLM, TrainingArguments

    from obert.training.trainer import ObertTrainer

    tok, data = _blocks(tmp_path, n=40, max_length=16)
    torch.manual_seed(0)
    student = BertForMaskedLM(tiny_config("bert")).eval()
    teacher = BertForMaskedLM(tiny_config("bert")).eval()
    batch = fixed_masking(data, mlm_collator(tok), 6, seed=3)[0]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    T = 2.0
    trainer = ObertTrainer(model=student, args=args, teacher=teacher, hardness=1.0, temperature=T,
                           kd_positions="masked")
    student.eval()  # the Trainer leaves the mode alone; dropout off for an exact comparison
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        keep = batch["labels"] != -100
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s = student(**inputs).logits[keep].double() / T
        t = teacher(**inputs).logits[keep].double() / T
        want = T * T * float((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean())
    # (float32 in the trainer: the KL of near distributions loses a few digits)
    assert float(got.detach()) == pytest.approx(want, rel=1e-4)
    every = ObertTrainer(model=student, args=args, teacher=teacher, hardness=1.0, temperature=T)
    assert float(every.compute_loss(student, dict(batch)).detach()) != pytest.approx(want, rel=0.05)


def test_masked_positions_are_for_masked_lm_only(tmp_path, tiny_model_dir, data_files):
    from conftest import tiny_recipe

    from obert.training.recipe import Recipe

    doc = tiny_recipe(tmp_path, data_files, tiny_model_dir)
    doc["distillation"] = {"teacher": str(tiny_model_dir), "positions": "masked"}
    with pytest.raises(Exception, match="positions: masked is for masked-lm"):
        Recipe.model_validate(doc)
