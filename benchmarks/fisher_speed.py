"""Fisher phase speed: batched Gram + Cholesky inverse vs the paper's m rank-one Woodbury updates.

    .venv/bin/python benchmarks/fisher_speed.py [--layers 1] [--num-grads 256] [--rounds 3]

Random gradients shaped like MiniLM's prunable weights (per encoder layer: 4 x 384x384 +
2 x 384x1536 = 1.77M weights), B=50, damp 1e-7. Both paths run in this process on the same
gradients, interleaved over rounds; prints each time, the median ratio and the largest relative
difference between the two inverses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from obert.core.obs import StreamingFisher, woodbury_fisher_inverse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--num-grads", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    B, m = args.block_size, args.num_grads
    d = args.layers * (4 * 384 * 384 + 2 * 384 * 1536)
    d -= d % B
    torch.manual_seed(0)
    grads = torch.randn(m, d) * 1e-3
    ratios = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        acc = StreamingFisher(d, B, 1e-7)
        for chunk in grads.split(64):
            acc.update(chunk)
        t_gram = time.perf_counter() - t0
        ours = acc.inverse()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = woodbury_fisher_inverse(grads, B, 1e-7)
        t_ref = time.perf_counter() - t0
        ratios.append(t_ref / t_ours)
        err = float(((ours - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max())
        print(f"round {r}: gram+cholesky {t_ours:.2f}s (gram {t_gram:.2f}s)  woodbury {t_ref:.2f}s  "
              f"ratio {t_ref / t_ours:.1f}x  max rel diff {err:.1e}", flush=True)
        del ours, ref
    print(f"d={d:,} weights, m={m}, B={B}: median speed-up {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
