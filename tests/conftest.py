"""Tiny randomly initialised encoders and data files built on the fly (no hub, no downloads)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega red green blue cyan magenta yellow black white").split()
LABELS = ["math", "net", "sound"]


def make_rows(n: int, seed: int) -> list[dict]:
    """Rows whose label is predictable from the words (so training can learn something)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(len(LABELS))
        words = [WORDS[(label * 10 + rng.randrange(10)) % len(WORDS)] for _ in range(rng.randint(3, 12))]
        rows.append({"text": " ".join(words), "label": LABELS[label]})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # The vocabulary goes in as a mapping: Transformers 5 ignores ``vocab_file`` here and builds a
    # tokenizer of the special tokens alone, which maps every word to [UNK].
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})
    assert tok(WORDS[0])["input_ids"] == [2, 5, 3], "test tokenizer lost its vocabulary"
    return tok


def tiny_config(family: str, num_labels: int = 3):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=len(WORDS) + 5, num_labels=num_labels,
                  id2label={i: l for i, l in enumerate(LABELS)},
                  label2id={l: i for i, l in enumerate(LABELS)})
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=70, pad_token_id=0,
                             bos_token_id=2, eos_token_id=3, **common)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                max_position_embeddings=64, pad_token_id=0, **common)
    raise ValueError(family)


def tiny_model(family: str = "bert", seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(family))


def block4_pruned_dir(model_dir, out, sparsity: float = 0.7, seed: int = 4, group: int = 4):
    """Save a copy of the classifier in ``model_dir`` with ``sparsity`` of every block weight
    zero in groups of ``group`` consecutive inputs (4: a model the int8 kernels take); returns
    ``(out, model)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from obert import find_targets

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    torch.manual_seed(seed)
    for t in find_targets(model):
        w = t.module.weight.data
        w.mul_((torch.rand(w.shape[0], w.shape[1] // group) >= sparsity).repeat_interleave(group, 1))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out, model.eval()


@pytest.fixture
def data_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", make_rows(96, 0)),
            write_jsonl(tmp_path / "eval.jsonl", make_rows(48, 1)))


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny BERT classifier with its tokenizer, as `obert prune` expects."""
    out = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(out)
    make_tokenizer(tmp_path).save_pretrained(out)
    return str(out)


def _kernel_isas() -> list:
    """Every instruction-set path of the native kernels this CPU runs, or ``["none"]`` without
    native kernels (the tests then check the PyTorch fallback)."""
    from obert import native as kernels

    return kernels.available_isas() or ["none"]


@pytest.fixture(params=_kernel_isas())
def isa(request, monkeypatch):
    """Runs the test once per kernel path this machine has, forced through ``OBERT_ISA``."""
    if request.param != "none":
        monkeypatch.setenv("OBERT_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True)
def speed_cache(tmp_path_factory, monkeypatch):
    """compile's per-CPU timing cache goes to a temporary directory, not the user's."""
    from obert.runtime import choose

    path = tmp_path_factory.mktemp("speed") / "cache.json"
    monkeypatch.setattr(choose, "cache_path", lambda: path)
    return path


# -- helpers shared by several test modules ------------------------------------------------
def qa_rows(n: int, seed: int) -> list[dict]:
    """SQuAD-style rows whose answer is the one colour word of a random context."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(8, 20))]
        pos = rng.randrange(len(words))
        words[pos] = rng.choice(["red", "green", "blue"])  # the answer is the colour word
        context = " ".join(words)
        start = len(" ".join(words[:pos])) + (1 if pos else 0)
        rows.append({"id": f"{seed}-{i}", "question": "which colour", "context": context,
                     "answers": {"text": [words[pos]], "answer_start": [start]}})
    return rows


def tiny_qa_recipe(tmp_path) -> dict:
    """A recipe for gradual pruning of a tiny random BERT QA model on colour-word questions."""
    from transformers import AutoModelForQuestionAnswering, BertConfig

    model_dir = tmp_path / "qa-model"
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    AutoModelForQuestionAnswering.from_config(cfg).save_pretrained(model_dir)
    make_tokenizer(tmp_path).save_pretrained(model_dir)
    for name, n, seed in (("train.jsonl", 64, 0), ("dev.jsonl", 24, 1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in qa_rows(n, seed)))
    return {"model": {"path": str(model_dir), "task_type": "question-answering"},
            "data": {"train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "dev.jsonl")},
            "training": {"epochs": 2, "lr": 1e-3, "batch_size": 16, "max_length": 32, "doc_stride": 8,
                         "seed": 0},
            "pruning": {"init_sparsity": 0.4, "final_sparsity": 0.6, "start_epoch": 0, "end_epoch": 1,
                        "frequency": 1, "num_grads": 8, "grad_batch_size": 8, "fisher_block_size": 16},
            "distillation": {"teacher": str(model_dir), "hardness": 0.5, "temperature": 2.0},
            "output_dir": str(tmp_path / "out")}


def encoded_rows(tmp_path, model, n=64, max_length=16):
    """Tokenised training rows of the tiny classification data for ``model``."""
    from obert.tasks.data import Encoded, TextData

    tok = make_tokenizer(tmp_path)
    rows = make_rows(n, 3)
    data = TextData([r["text"] for r in rows], None, [r["label"] for r in rows])
    return Encoded(data, tok, model.config.label2id, max_length)


def reference_inverse(grads, block_size, damp):
    """Explicit per-block inverse of damp*I + G_b^T G_b / m, float64."""
    m, d = grads.shape
    out = []
    for b in range(d // block_size):
        gb = grads[:, b * block_size:(b + 1) * block_size].double()
        out.append(torch.inverse(damp * torch.eye(block_size, dtype=torch.float64) + gb.T @ gb / m))
    return torch.stack(out)


class Crashed(Exception):
    """A training run killed by ``crash_at``."""


def crash_at(step: int):
    """A Trainer callback that kills the run at the end of optimizer step ``step``."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crashed()

    return Crash()


def tiny_recipe(tmp_path, data_files, model_dir, **over) -> dict:
    doc = {
        "model": {"path": model_dir},
        "data": {"train_file": data_files[0], "eval_file": data_files[1]},
        "training": {"epochs": 4, "lr": 1e-3, "batch_size": 16, "max_length": 16, "seed": 0,
                     "weight_decay": 0.01, "logging_steps": 2},
        "pruning": {"method": "obert", "init_sparsity": 0.5, "final_sparsity": 0.8,
                    "start_epoch": 1, "end_epoch": 3, "frequency": 1, "num_grads": 8,
                    "grad_batch_size": 8, "fisher_block_size": 16},
        "distillation": {"teacher": model_dir, "hardness": 0.5, "temperature": 2.0},
        "output_dir": str(tmp_path / "out"),
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    pruning = doc.get("pruning")
    if isinstance(pruning, dict) and pruning.get("method") != "obert":  # oBERT's settings go with it
        for name in ("num_grads", "fisher_block_size"):
            if f"pruning__{name}" not in over:
                pruning.pop(name, None)
    return doc


def train_with_pruning_callback(tmp_path, data_files, model_dir, prune_config, step_check,
                                **training_args):
    """A user's own ``transformers.Trainer`` (AdamW, weight decay, 3 epochs) with
    ``OBertPruningCallback`` (0.3 -> 0.6 at epochs 0/1/2); ``step_check(pruning, optimizer)`` runs
    after every optimizer step. Returns the callback and the sparsity after every step."""
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from obert.training.callback import OBertPruningCallback
    from obert.tasks.data import Encoded, label_map_from_config, load_file
    from obert.training.schedule import PruningSchedule

    tok = make_tokenizer(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    train = Encoded(load_file(data_files[0]), tok, label_map_from_config(model.config), 16)
    collator = DataCollatorWithPadding(tok)
    pruning = OBertPruningCallback(PruningSchedule(0.3, 0.6, 0, 2, 1), prune_config, train, collator,
                                   log=lambda s: None)
    checked = []

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            step_check(pruning, optimizer)
            checked.append(pruning.sparsity)

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=3,
                             learning_rate=1e-2, weight_decay=0.5, per_device_train_batch_size=16,
                             save_strategy="no", report_to="none", disable_tqdm=True, **training_args)
    Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
            callbacks=[pruning, Check()]).train()
    return pruning, checked
