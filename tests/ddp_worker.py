"""Gradual oBERT pruning in a plain Trainer, run by ``torchrun`` (test_ddp.py) or directly.

    python ddp_worker.py WORKDIR GLOBAL_BATCH      (or torchrun --nproc_per_node 2 ...)

Float64 and no dropout, so one process and two processes train the same trajectory up to
rounding; rank 0 writes the final masks and weights to WORKDIR/result-<world>.pt.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_rows, make_tokenizer, tiny_config, write_jsonl  # noqa: E402


def main(work: str, global_batch: int) -> None:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

    from obert import PruneConfig
    from obert.training.callback import OBertPruningCallback
    from obert.tasks.data import Encoded, label_map_from_config, load_file
    from obert.distributed import rank, world_size
    from obert.training.schedule import PruningSchedule
    from obert.training.trainer import ObertTrainer

    work = Path(work)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    model = AutoModelForSequenceClassification.from_config(config).double()
    tok = make_tokenizer(work)
    rows = write_jsonl(work / "train.jsonl", make_rows(96, 0)) if not (work / "train.jsonl").exists() \
        else str(work / "train.jsonl")
    train = Encoded(load_file(rows), tok, label_map_from_config(model.config), 16)
    collator = DataCollatorWithPadding(tok)
    pruning = OBertPruningCallback(PruningSchedule(0.3, 0.7, 0, 2, 1),
                                   PruneConfig(0.7, num_grads=12, grad_batch_size=4, fisher_block_size=16),
                                   train, collator, log=lambda s: None)
    args = TrainingArguments(output_dir=str(work / f"trainer-{world}"), num_train_epochs=3,
                             learning_rate=5e-3, weight_decay=0.01,
                             per_device_train_batch_size=global_batch // world, save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=True, seed=0, data_seed=0)
    ObertTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
            callbacks=[pruning]).train()
    assert world_size() == world
    if rank() == 0:
        torch.save({"masks": pruning.masks.masks, "steps": [h["step"] for h in pruning.history],
                    "weights": {t.name: t.module.weight.detach() for t in pruning.masks.targets}},
                   work / f"result-{world}.pt")
    from obert.distributed import finish

    finish()  # as obert's CLI does: no process-group teardown at interpreter exit


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
