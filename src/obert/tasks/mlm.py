"""Masked-language modelling: the objective of upstream pruning (Prune Once for All).

* Data: plain text, one document per line (``.txt``), the ``text`` column of ``.jsonl``/``.csv``
  files (other columns, labels included, are ignored), or ``datasets`` corpora by name
  (``wikitext:wikitext-103-raw-v1``: name and configuration; several joined with ``+``; their
  train and validation splits). Without evaluation text (no ``eval_file``, or a corpus without a
  validation split) the last training documents are held out: ``max_eval_rows`` (default
  2,000), at most a tenth of the documents.
* Examples: documents tokenised with their special tokens, concatenated and cut into blocks of
  ``max_length`` tokens (as Hugging Face's ``run_mlm`` groups texts), so no position is padding.
* Masking: 15% of the non-special tokens, of which 80% become ``[MASK]``, 10% a random token and
  10% stay (``DataCollatorForLanguageModeling``), drawn afresh for every training batch;
  evaluation uses one fixed masking of the held-out blocks (seeded), so runs compare.
* Metrics: masked-token accuracy, the mean cross-entropy over masked tokens and its perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from obert.distributed import rank
from obert.errors import ObertError, first_line
from obert.model.heads import labelled_positions_only
from obert.model.loading import (ENCODER, check_length, load_config, load_tokenizer, load_weights,
                                 quiet_libraries, require_kind)
from obert.tasks.base import Task, TaskInputs
from obert.tasks.data import sample_indices

MLM_PROBABILITY = 0.15
HELD_OUT = 2000  # documents held out for evaluation when a corpus has no validation split


def load_texts(path: str | Path) -> list[str]:
    """Documents of a text file: non-empty lines of ``.txt``; the ``text`` column of ``.jsonl``,
    ``.json`` or ``.csv`` (through ``datasets``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ObertError(f"text file {'is a directory' if path.is_dir() else 'not found'}: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise ObertError(f"{path}: not UTF-8 text (offset {exc.start})") from None
    elif suffix in (".jsonl", ".json", ".csv"):
        import datasets

        try:
            with quiet_libraries(datasets=True):
                ds = datasets.load_dataset("csv" if suffix == ".csv" else "json",
                                           data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            raise ObertError(f"cannot read {path}: {first_line(exc)}") from exc
        if "text" not in ds.column_names:
            raise ObertError(f"{path}: no 'text' column (have: {', '.join(ds.column_names)})")
        texts = [t.strip() if isinstance(t, str) else "" for t in ds["text"]]
    else:
        raise ObertError(f"unsupported text file type '{suffix}' (use .txt, .jsonl, .json or "
                         f".csv): {path}")
    texts = [t for t in texts if t]
    if not texts:
        raise ObertError(f"{path}: no text")
    return texts


def load_corpus(name: str, split: str) -> list[str]:
    """The ``text`` column of ``datasets`` corpora: ``name`` or ``name:config``, several joined
    with ``+`` (``bookcorpus+wikipedia:20220301.en``); ``split`` is train or eval (validation)."""
    if "+" in name:
        return [t for part in name.split("+") for t in load_corpus(part.strip(), split)]
    import datasets

    corpus, _, config = name.partition(":")
    try:
        with quiet_libraries(datasets=True):
            ds = datasets.load_dataset(corpus, config or None,
                                       split="validation" if split == "eval" else "train")
    except Exception as exc:
        raise ObertError(f"cannot load corpus '{name}' (is the hub reachable?): "
                         f"{first_line(exc)}") from exc
    if "text" not in ds.column_names:
        raise ObertError(f"corpus '{name}' has no 'text' column (have: {', '.join(ds.column_names)})")
    texts = [t.strip() for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ObertError(f"corpus '{name}': no text in its {split} split")
    return texts


def group_blocks(token_lists: list[list[int]], block: int) -> list[list[int]]:
    """The token lists concatenated and cut into blocks of ``block`` tokens; the remainder is
    dropped unless it is all there is."""
    flat = [t for ids in token_lists for t in ids]
    blocks = [flat[i:i + block] for i in range(0, len(flat) - block + 1, block)]
    return blocks or ([flat] if flat else [])


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of token ids (``input_ids`` and ``attention_mask``), the masked-LM examples."""

    def __init__(self, texts: list[str], tokenizer, max_length: int) -> None:
        # Whole documents (a long one fills several blocks): no truncation before grouping, and
        # no warning about lengths beyond the model's (the blocks are max_length long).
        with quiet_libraries():
            enc = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        self.blocks = group_blocks(enc, max_length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def mlm_collator(tokenizer):
    """Pads a batch and masks ``MLM_PROBABILITY`` of its non-special tokens (labels -100
    elsewhere), with torch's global generator (the Trainer seeds it)."""
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise ObertError("the tokenizer has no mask token: masked-LM training needs one")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY)


def fixed_masking(data: TokenBlocks, collator, batch_size: int, seed: int) -> list[dict]:
    """Evaluation batches masked once with ``seed`` (the caller's random state is kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [collator([data[j] for j in range(i, min(i + batch_size, len(data)))])
                for i in range(0, len(data), batch_size)]


@torch.no_grad()
def evaluate(model, batches: list[dict], progress: bool = True) -> dict:
    """Masked-token accuracy, mean cross-entropy over the masked tokens, and its perplexity."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with labelled_positions_only(model):  # the head at the masked tokens only
            logits = model(**batch).logits
        masked = batch["labels"] != -100
        target = batch["labels"][masked]
        chosen = (logits[masked] if logits.dim() == 3 else logits).float()
        correct += int((chosen.argmax(-1) == target).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(chosen, target, reduction="sum"))
        total += int(masked.sum())
    model.train(was_training)
    if total == 0:
        raise ObertError("the evaluation text has no tokens to mask")
    loss = loss_sum / total
    return {"accuracy": correct / total, "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "num_tokens": total}


def has_mlm_head(config) -> bool:
    """Whether the checkpoint was saved with its masked-LM head (``...ForMaskedLM`` or
    ``...ForPreTraining``), not as a bare encoder (e.g. a sentence-embedding model)."""
    arch = (config.architectures or [""])[0]
    return arch.endswith(("ForMaskedLM", "ForPreTraining"))


def load_mlm(path: str, what: str = "model"):
    from transformers import AutoModelForMaskedLM

    return load_weights(AutoModelForMaskedLM, path, what)


def build_task(inputs: TaskInputs) -> Task:
    """Masked-LM pre-training objective on plain text: a masked-LM model (a bare encoder gets a
    new head, which the log says), masked-token accuracy."""
    d = inputs

    def sample(found: list[str], rows: int | None) -> list[str]:
        keep = sample_indices(len(found), rows, d.seed)
        return found if keep is None else [found[i] for i in keep]

    config = load_config(d.model_path)
    require_kind(config, d.model_path, (ENCODER,), "masked-LM training")
    tokenizer = load_tokenizer(d.model_path, d.tokenizer, config)
    collator = mlm_collator(tokenizer)
    check_length(d.max_length, config, "training.max_length", tokenizer)
    if d.train_file:
        train_texts = load_texts(d.train_file)
        eval_texts = load_texts(d.eval_file) if d.eval_file else None
        source = d.train_file
    else:
        train_texts, source = load_corpus(d.data_task, "train"), d.data_task
        try:
            eval_texts = load_corpus(d.data_task, "eval")
        except ObertError:  # BookCorpus and Wikipedia have no validation split
            eval_texts = None
    if eval_texts is None:  # hold the last documents out
        held = max(1, min(d.max_eval_rows or HELD_OUT, len(train_texts) // 10))
        if len(train_texts) <= held:
            raise ObertError(f"{source}: {len(train_texts)} document(s) and no evaluation text: "
                             "too few to hold some out for evaluation")
        d.log(f"[obert] {source} has no evaluation text: the last {held} training documents are "
              "held out for evaluation")
        train_texts, eval_texts = train_texts[:-held], train_texts[-held:]
    if not has_mlm_head(config):
        d.log(f"[obert] note: {d.model_path} has no masked-LM head: a new one is trained "
              "(a teacher needs a trained one)")
    model = load_mlm(d.model_path)
    train_ds = TokenBlocks(sample(train_texts, d.max_train_rows), tokenizer, d.max_length)
    eval_ds = TokenBlocks(sample(eval_texts, d.max_eval_rows), tokenizer, d.max_length)
    eval_batches = fixed_masking(eval_ds, collator, d.eval_batch_size, d.seed)

    def load_teacher(path: str):
        teacher_config = load_config(path, "teacher")
        require_kind(teacher_config, path, (ENCODER,), "distillation.teacher")
        if not has_mlm_head(teacher_config):
            raise ObertError(f"teacher '{path}' has no masked-LM head: train one first (a "
                             "masked-LM run without pruning on the same text)")
        teacher = load_mlm(path, "teacher")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ObertError(f"teacher '{path}' has a vocabulary of {teacher.config.vocab_size} "
                             f"tokens, the model {model.config.vocab_size}")
        return teacher

    return Task("masked-lm", "accuracy", tokenizer, model, train_ds, collator,
                lambda m: evaluate(m, eval_batches, progress=d.progress and rank() == 0),
                load_teacher)
