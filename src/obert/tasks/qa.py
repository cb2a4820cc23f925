"""Extractive question answering (SQuAD v1.1 format): loading, features, answers, F1/EM.

* Data: the official SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}``),
  JSONL rows in the Hugging Face ``squad`` layout (``id, question, context, answers: {text,
  answer_start}``), or ``--task squad`` through ``datasets``.
* Features: question + context windows of ``max_length`` tokens overlapping by ``doc_stride``
  (``truncation="only_second"``); training windows that do not contain the answer point at
  [CLS].
* Answers: the best ``start <= end`` span (at most ``max_answer_length`` tokens) inside the
  context over all windows of an example, scored ``start_logit + end_logit`` over the
  ``n_best`` candidates of each side.
* Metrics: the official SQuAD v1.1 scorer (answer normalisation, max over the gold answers),
  the algorithm behind ``evaluate.load("squad")``, computed here because that metric is a script
  fetched from the hub and obert must score offline.
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from obert.distributed import rank
from obert.model.loading import (ENCODER, QA, check_length, load_config, load_tokenizer,
                                 load_weights, require_kind)
from obert.tasks.base import Task, TaskInputs
from obert.tasks.data import take_rows
from obert.errors import ObertError, first_line


@dataclass
class QAData:
    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[dict]  # {"text": [...], "answer_start": [...]}

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int | None, seed: int = 0) -> "QAData":
        """``n`` rows drawn without replacement with ``seed`` (all rows when n is None)."""
        return take_rows(self, n, seed)


def _rows_from_squad_json(doc: dict) -> list[dict]:
    rows = []
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


def load_qa(source: str | None = None, task: str | None = None, split: str = "train") -> QAData:
    """QA rows from a local file or ``task="squad"`` (``split``: train or eval)."""
    if source:
        path = Path(source)
        if not path.is_file():
            raise ObertError(f"data file not found: {path}")
        try:
            text = path.read_text()
            if path.suffix.lower() == ".json" and text.lstrip().startswith("{") and '"data"' in text[:1000]:
                rows = _rows_from_squad_json(json.loads(text))
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ObertError(f"cannot read {path} as SQuAD data: {first_line(exc)}") from exc
        where = str(path)
    elif task:
        if task not in ("squad", "squad_v1", "squad1"):
            raise ObertError(f"unknown question-answering task '{task}' (known: squad)")
        import datasets

        try:
            ds = datasets.load_dataset("squad", split="validation" if split == "eval" else "train")
        except Exception as exc:
            raise ObertError(f"cannot load SQuAD (is the hub reachable?): {first_line(exc)}") from exc
        rows, where = ds.to_list(), "squad"
    else:
        raise ObertError("give a data file or --task")
    if not rows:
        raise ObertError(f"{where}: no rows")
    for r in rows:
        missing = [k for k in ("id", "question", "context", "answers") if k not in r]
        if missing:
            raise ObertError(f"{where}: rows need id, question, context and answers (missing "
                             f"{', '.join(missing)})")
    return QAData([str(r["id"]) for r in rows], [r["question"] for r in rows],
                  [r["context"] for r in rows], [r["answers"] for r in rows])


def _windows(data: QAData, tokenizer, max_length: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise ObertError("question answering needs a fast tokenizer (offset mappings)")
    if doc_stride >= max_length // 2:
        raise ObertError(f"doc_stride {doc_stride} must be below half of max_length {max_length}")
    if tokenizer.padding_side != "right":
        raise ObertError("question answering expects a tokenizer that pads on the right")
    return tokenizer([q.lstrip() for q in data.questions], data.contexts, truncation="only_second",
                     max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True)


def train_features(data: QAData, tokenizer, max_length: int = 384, doc_stride: int = 128) -> list[dict]:
    """Training windows with ``start_positions``/``end_positions`` (token indices; 0 = no answer)."""
    enc = _windows(data, tokenizer, max_length, doc_stride)
    features = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        ans = data.answers[ex]
        start_tok = end_tok = 0
        if ans["answer_start"]:
            start_char = ans["answer_start"][0]
            end_char = start_char + len(ans["text"][0])
            ctx = [j for j, s in enumerate(seq) if s == 1]
            c0, c1 = ctx[0], ctx[-1]
            if offsets[c0][0] <= start_char and offsets[c1][1] >= end_char:
                start_tok = c0
                while start_tok <= c1 and offsets[start_tok][0] <= start_char:
                    start_tok += 1
                start_tok -= 1
                end_tok = c1
                while end_tok >= c0 and offsets[end_tok][1] >= end_char:
                    end_tok -= 1
                end_tok += 1
        f = {k: enc[k][i] for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
        f.update(start_positions=start_tok, end_positions=end_tok)
        features.append(f)
    return features


@dataclass
class EvalFeatures:
    features: list[dict]  # model inputs
    example_index: list[int]
    offsets: list[list]  # per token (start, end) inside the context, None elsewhere


def eval_features(data: QAData, tokenizer, max_length: int = 384, doc_stride: int = 128) -> EvalFeatures:
    enc = _windows(data, tokenizer, max_length, doc_stride)
    feats, ex_idx, offs = [], [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        feats.append({k: enc[k][i] for k in enc.keys()
                      if k not in ("offset_mapping", "overflow_to_sample_mapping")})
        ex_idx.append(enc["overflow_to_sample_mapping"][i])
        offs.append([o if s == 1 else None for o, s in zip(offsets, seq)])
    return EvalFeatures(feats, ex_idx, offs)


def best_answers(data: QAData, feats: EvalFeatures, start_logits: list[np.ndarray],
                 end_logits: list[np.ndarray], n_best: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """``id -> answer text``: the highest ``start + end`` logit span over an example's windows."""
    by_example = collections.defaultdict(list)
    for i, ex in enumerate(feats.example_index):
        by_example[ex].append(i)
    preds = {}
    for ex in range(len(data)):
        best_score, best_text = -np.inf, ""
        for i in by_example[ex]:
            s_log, e_log, offsets = start_logits[i], end_logits[i], feats.offsets[i]
            starts = np.argsort(s_log)[::-1][:n_best]
            ends = np.argsort(e_log)[::-1][:n_best]
            for s in starts:
                for e in ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_log[s] + e_log[e]
                    if score > best_score:
                        best_score = score
                        best_text = data.contexts[ex][offsets[s][0]:offsets[e][1]]
        preds[data.ids[ex]] = best_text
    return preds


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], data: QAData) -> dict:
    """``exact_match`` and ``f1`` in percent, each the max over an example's gold answers."""
    em = f1 = 0.0
    for qid, answers in zip(data.ids, data.answers):
        golds = answers["text"] or [""]
        pred = predictions.get(qid, "")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(data), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


@torch.no_grad()
def evaluate_qa(model, data: QAData, feats: EvalFeatures, collate, batch_size: int = 32,
                progress: bool = True) -> dict:
    """F1/EM of ``model`` on ``data`` (windows ``feats``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts, ends = [], []
    idx = list(range(len(feats.features)))
    for b in tqdm(range(0, len(idx), batch_size), desc="evaluate", disable=not progress, leave=False):
        batch = collate([feats.features[i] for i in idx[b:b + batch_size]])
        out = model(**{k: v.to(device) for k, v in batch.items()})
        for s, e in zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()):
            starts.append(s)
            ends.append(e)
    model.train(was_training)
    preds = best_answers(data, feats, starts, ends)
    return {**squad_metrics(preds, data), "num_examples": len(data)}


def build_task(inputs: TaskInputs) -> Task:
    """Extractive question answering: windows over the contexts, a QA head, SQuAD F1 / EM."""
    from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

    d, path = inputs, inputs.model_path
    config = load_config(path)
    if require_kind(config, path, (QA, ENCODER), "question answering") == ENCODER:
        d.log(f"[obert] {path} is an encoder without a question-answering head: adding one")
    tokenizer = load_tokenizer(path, d.tokenizer, config)
    check_length(d.max_length, config, "training.max_length", tokenizer)
    train = load_qa(d.train_file, d.data_task if d.train_file is None else None, "train")
    dev = load_qa(d.eval_file, d.data_task if d.eval_file is None else None, "eval")
    train, dev = train.subset(d.max_train_rows, d.seed), dev.subset(d.max_eval_rows, d.seed)
    model = load_weights(AutoModelForQuestionAnswering, path)
    collator = DataCollatorWithPadding(tokenizer)
    features = train_features(train, tokenizer, d.max_length, d.doc_stride)
    dev_feats = eval_features(dev, tokenizer, d.max_length, d.doc_stride)

    def load_teacher(teacher: str):
        require_kind(load_config(teacher, "teacher"), teacher, (QA,), "distillation.teacher")
        return load_weights(AutoModelForQuestionAnswering, teacher, "teacher")

    return Task("question-answering", "f1", tokenizer, model, features, collator,
                lambda m: evaluate_qa(m, dev, dev_feats, collator, d.eval_batch_size,
                                      progress=d.progress and rank() == 0),
                load_teacher)
