"""Does the compiled model answer like the pruned model it came from, on real text?

    .venv/bin/python benchmarks/runtime_agreement.py runs/minilm-mag90-b4 runs/gradual/obert90 ...

For each pruned model directory: the debian-sections validation split (1,536 rows) at length 128,
padded batches (so the attention mask matters), through the model as PyTorch runs it and through
``obert.runtime.compile`` in float32 and (block4 models) int8: weights rounded to nearest, by
OBS rounding, and by OBS rounding with smoothed inputs (both calibrated on ``--calibration-rows``
train rows). Reports accuracy, the share of rows whose argmax equals the PyTorch model's, and the
largest logit difference. Writes
docs/runtime/agreement.json and the table between ``<!-- runtime-agreement:begin/end -->`` in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, log, replace_doc_block  # noqa: E402

BEGIN, END = "<!-- runtime-agreement:begin -->", "<!-- runtime-agreement:end -->"


@torch.inference_mode()
def logits_of(model, batches) -> torch.Tensor:
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                      for b in batches])


def evaluate(path: str, max_length: int, batch_size: int, calibration_rows: int) -> dict:
    from transformers import AutoTokenizer

    from obert.tasks.data import Encoded, label_map_from_config, load_file
    from obert.runtime import compile
    from obert.runtime.bench import load_model

    model = load_model(path)
    data = Encoded(load_file(DATA / "validation.jsonl"), AutoTokenizer.from_pretrained(path),
                   label_map_from_config(model.config), max_length)
    batches = list(data.loader(batch_size))
    # Calibration text for OBS rounding of the int8 weights: train rows, never validation ones.
    calib = list(Encoded(load_file(DATA / "train.jsonl").subset(calibration_rows, seed=0),
                         data.tokenizer, label_map_from_config(model.config), max_length).loader(batch_size))
    labels = torch.cat([b["labels"] for b in batches])
    ref = logits_of(model, batches)
    out = {"model": path, "rows": len(labels), "max_length": max_length,
           "pytorch": {"accuracy": float((ref.argmax(-1) == labels).float().mean())}}
    variants = {"float32": {}, "int8": {}, "int8 OBS rounding": {"calibration": calib, "smooth": 0},
                "int8 OBS rounding + smoothing": {"calibration": calib}}
    for variant, options in variants.items():
        dtype = variant.split()[0]
        compiled = copy.deepcopy(model)
        report = compile(compiled, dtype=dtype, **options)
        if dtype == "int8" and not any(getattr(m, "quantized", False) for m in compiled.modules()):
            continue  # not block4: no int8 layers
        got = logits_of(compiled, batches)
        flipped = got.argmax(-1) != ref.argmax(-1)
        top2 = ref.topk(2, -1).values
        margin = top2[:, 0] - top2[:, 1]  # how far PyTorch's answer is from a tie
        worst = float(margin[flipped].max()) if flipped.any() else 0.0
        out[f"obert {variant}"] = {
            "accuracy": float((got.argmax(-1) == labels).float().mean()),
            "argmax_agreement": float(1 - flipped.float().mean()),
            "max_abs_logit_diff": float((got - ref).abs().max()),
            "mean_abs_logit_diff": float((got - ref).abs().mean()),
            # Every flipped row's top-2 margin is at most this; the share of all rows that close
            # to a tie says how many rows any perturbation of that size could flip.
            "flipped_max_top2_margin": worst,
            "rows_within_that_margin": float((margin <= worst).float().mean()) if flipped.any() else 0.0,
            "sparse_layers": len(report.sparse_layers)}
        log(f"{path} {variant}: {out[f'obert {variant}']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration-rows", type=int, default=512,
                    help="train rows whose activations calibrate OBS rounding of the int8 weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from obert.io import write_json

    results = [evaluate(m, args.max_length, args.batch_size, args.calibration_rows) for m in args.models]
    write_json(ROOT / "docs" / "runtime" / "agreement.json", {"results": results})
    lines = [f"debian-sections validation ({results[0]['rows']} rows, length {args.max_length}, "
             "padded batches)", "",
             "| model | variant | accuracy | argmax = PyTorch's | max abs logit diff | flipped rows: largest PyTorch top-2 margin (rows that close to a tie) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | PyTorch (dense kernels) | {100 * r['pytorch']['accuracy']:.1f} | | | |")
        for name, v in r.items():
            if not name.startswith("obert "):
                continue
            flips = (f"{v['flipped_max_top2_margin']:.3f} ({100 * v['rows_within_that_margin']:.1f}%)"
                     if v["argmax_agreement"] < 1 else "none")
            lines.append(f"| | {name} | {100 * v['accuracy']:.1f} | {100 * v['argmax_agreement']:.2f}% "
                         f"| {v['max_abs_logit_diff']:.2e} | {flips} |")
    table = "\n".join(lines)
    print(table)
    replace_doc_block(BEGIN, END, table)


if __name__ == "__main__":
    main()
