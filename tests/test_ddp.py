"""Two processes (gloo, CPU) prune exactly like one: the Fisher's m gradients are dealt across
ranks and their Gram sums all-reduced, and every rank ends with the same masks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd: list[str], work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.timeout(900)
def test_two_processes_give_the_masks_of_one(tmp_path):
    _run([sys.executable, str(WORKER), str(tmp_path), "16"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", "29533"]
    _run(torchrun + [str(WORKER), str(tmp_path), "16"], tmp_path)
    one = torch.load(tmp_path / "result-1.pt")
    two = torch.load(tmp_path / "result-2.pt")
    assert one["steps"] == two["steps"] == [0, 6, 12]  # steps per epoch counted per process
    for name, mask in one["masks"].items():
        assert torch.equal(mask, two["masks"][name]), name
        torch.testing.assert_close(one["weights"][name], two["weights"][name], rtol=1e-9, atol=1e-11)
    pruned = sum(int((~m).sum()) for m in one["masks"].values())
    total = sum(m.numel() for m in one["masks"].values())
    assert pruned / total == pytest.approx(0.7, abs=1e-3)


@pytest.mark.timeout(900)
def test_obert_train_under_torchrun(tmp_path):
    """``torchrun -m obert.cli train`` with 2 processes: one output, written by rank 0, with the
    pruning steps placed by the optimizer steps of one process (96 rows / (2 x 16) = 3 per epoch)."""
    import json

    import yaml

    from conftest import make_rows, make_tokenizer, tiny_model, write_jsonl

    model_dir = tmp_path / "tiny"
    tiny_model("bert").save_pretrained(model_dir)
    make_tokenizer(tmp_path).save_pretrained(model_dir)
    recipe = {"model": {"path": str(model_dir)},
              "data": {"train_file": write_jsonl(tmp_path / "train.jsonl", make_rows(96, 0)),
                       "eval_file": write_jsonl(tmp_path / "eval.jsonl", make_rows(32, 1))},
              "training": {"epochs": 3, "lr": 1e-3, "batch_size": 16, "max_length": 16, "seed": 0},
              "pruning": {"init_sparsity": 0.4, "final_sparsity": 0.6, "start_epoch": 1, "end_epoch": 2,
                          "frequency": 1, "num_grads": 8, "grad_batch_size": 4, "fisher_block_size": 16},
              "distillation": {"teacher": str(model_dir), "hardness": 1.0},
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          "29537", "-m", "obert.cli", "train", "--recipe", str(tmp_path / "r.yaml"), "--no-progress"],
         tmp_path)
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert [s["step"] for s in record["steps"]] == [3, 6]
    assert record["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0 <= metrics["accuracy"] <= 1
    assert not (tmp_path / "out.checkpoints").exists()
