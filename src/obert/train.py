"""Model loading, dense fine-tuning (Hugging Face Trainer) and evaluation of sequence classifiers."""

from __future__ import annotations

import tempfile

import torch
from tqdm.auto import tqdm

from .data import Encoded
from .errors import ObertError, first_line


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present unless told otherwise."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_classifier(path: str, labels: list | None = None):
    """Tokenizer and sequence classifier from a hub id or local directory.

    With ``labels`` (sorted raw label values) the head is sized and named for them; without, the
    model must already carry its labels (a fine-tuned model).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # obert shows its own progress; keep loading quiet
    kwargs = {}
    if labels is not None:
        kwargs = {"num_labels": len(labels), "id2label": {i: str(v) for i, v in enumerate(labels)},
                  "label2id": {str(v): i for i, v in enumerate(labels)}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ObertError(f"cannot load model '{path}': {first_line(exc)}") from exc
    return tokenizer, model


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int = 64, progress: bool = True) -> dict:
    """Accuracy and mean loss of ``model`` on ``data`` (batches ordered by length for speed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in tqdm(data.loader(batch_size, by_length=True), desc="evaluate", disable=not progress,
                      leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * len(batch["labels"])
        total += len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / total, "loss": loss_sum / total, "num_examples": total}


def finetune(model, tokenizer, train: Encoded, *, epochs: float, lr: float, batch_size: int,
             seed: int = 0, lr_scheduler: str = "linear", weight_decay: float = 0.0,
             warmup_ratio: float = 0.0, progress: bool = True, callbacks: list | None = None):
    """Dense fine-tuning with the Hugging Face Trainer (AdamW); returns the trained model."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    # The Trainer moves the model to CUDA whenever CUDA exists: keep it where the caller put it.
    on_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="obert-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, learning_rate=lr,
            per_device_train_batch_size=batch_size, lr_scheduler_type=lr_scheduler,
            weight_decay=weight_decay, warmup_steps=warmup_ratio, seed=seed, data_seed=seed,
            save_strategy="no", report_to="none", logging_strategy="no",
            disable_tqdm=not progress, dataloader_num_workers=0,
            dataloader_pin_memory=not on_cpu, use_cpu=on_cpu,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=callbacks)
        trainer.train()
    return trainer.model
