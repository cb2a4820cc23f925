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


def block4_pruned_dir(model_dir, out, sparsity: float = 0.7, seed: int = 4):
    """Save a copy of the classifier in ``model_dir`` with ``sparsity`` of every block weight
    zero in groups of 4 consecutive inputs (a compilable model); returns ``(out, model)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from obert import find_targets

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    torch.manual_seed(seed)
    for t in find_targets(model):
        w = t.module.weight.data
        w.mul_((torch.rand(w.shape[0], w.shape[1] // 4) >= sparsity).repeat_interleave(4, 1))
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
    from obert.runtime import kernels

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
