"""Dense fine-tuning of a sequence classifier with the Hugging Face Trainer (`obert finetune`)."""

from __future__ import annotations

import tempfile

from obert.tasks.data import Encoded


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
