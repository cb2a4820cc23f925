"""``obert drop-layers``: load an encoder as it was saved, keep some of its transformer layers,
save it with its tokenizer, a record of the kept layers, the kept layers' sparsity (for a pruned
model) and a model card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from obert.card import model_card
from obert.errors import ObertError
from obert.io import check_output, claim_output, save_model_dir
from obert.model.loading import CLASSIFIER, ENCODER, QA, load_as_saved, load_tokenizer
from obert.model.masks import MaskSet, inherited_record
from obert.model.surgery import drop_layers, evenly_spaced, num_layers as count_layers
from obert.model.targets import find_targets


def drop_layers_dir(model: str, out: str | Path, *, keep: list[int] | None = None,
                    num_layers: int | None = None, tokenizer: str | None = None,
                    overwrite: bool = False, extra_files: dict | None = None,
                    log: Callable[[str], None] = print) -> tuple[list[int], int]:
    """Write ``model`` with the layers ``keep`` (or ``num_layers`` evenly spaced, first and last
    kept) to ``out``; returns the kept indices and the layer count before."""
    if (keep is None) == (num_layers is None):
        raise ObertError("give the layers to keep or how many (one of them)")
    out = check_output(out, inputs=[model, tokenizer], overwrite=overwrite)
    with claim_output(out):
        net = load_as_saved(model, (ENCODER, CLASSIFIER, QA), "drop-layers")
        total = count_layers(net)
        kept = list(keep) if keep is not None else evenly_spaced(total, num_layers)
        try:
            tok = load_tokenizer(model, tokenizer, net.config)
        except ObertError as exc:
            if tokenizer is not None:
                raise
            tok = None
            log(f"note: the output has no tokenizer ({exc})")
        drop_layers(net, kept)
        files: dict = {"layers.json": {"source_model": model, "num_layers_before": total,
                                       "kept_layers": kept}}
        if (Path(model) / "sparsity.json").is_file():  # a pruned model stays described
            files["sparsity.json"] = inherited_record(MaskSet.from_zeros(find_targets(net)), model)
        files["README.md"] = model_card(
            Path(out).name, what=[f"kept transformer layers {', '.join(map(str, kept))} of {total} "
                                  "(`obert drop-layers`), the rest of the model unchanged"],
            source=model, sparsity=files.get("sparsity.json"))
        save_model_dir(out, net, tok, {**files, **(extra_files or {})}, overwrite=overwrite)
    return kept, total
