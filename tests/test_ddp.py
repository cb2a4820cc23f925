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
