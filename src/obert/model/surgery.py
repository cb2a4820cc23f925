"""Model surgery: dropping transformer layers.

Layer dropping keeps some of the encoder's transformer blocks (Table 3 of the oBERT paper keeps
6 or 3 of BERT-base's 12) and leaves everything else as it was: embeddings, pooler and task head,
and the kept blocks' weights bit for bit. The blocks are found by module type
(``transformer_blocks``), so BERT (``encoder.layer``), RoBERTa and DistilBERT
(``transformer.layer``) need no name tables; the config's layer count (``num_hidden_layers``,
DistilBERT's ``n_layers`` through its attribute map) and any per-layer list in the config follow
(ModernBERT's ``layer_types``). Architectures that build a layer differently by its position
(ModernBERT's first layer has no attention norm) are checked: the model the new config builds
must take the kept weights, or nothing changes and the error says why.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from obert.errors import ObertError
from obert.model.targets import transformer_blocks


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` layer indices, evenly spaced with the first and the last kept:
    ``round(i * (total - 1) / (keep - 1))`` for i = 0..keep-1 (one layer: the first)."""
    if not 1 <= keep <= total:
        raise ObertError(f"--num-layers must be between 1 and the model's {total} layers, got {keep}")
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def check_keep(keep: list[int], total: int) -> list[int]:
    """``keep`` if it names layers that exist, each once, in increasing order; else one line."""
    if not keep:
        raise ObertError("--keep names no layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ObertError(f"--keep {bad[0]}: the model has layers 0 to {total - 1}")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise ObertError(f"--keep must list layers in increasing order, each once, got "
                         f"{','.join(map(str, keep))}")
    return keep


def num_layers(model: nn.Module) -> int:
    """How many transformer blocks the model has."""
    return len(_blocks(model)[1])


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    blocks = transformer_blocks(model)
    if blocks is None:
        raise ObertError("the model has no stack of transformer layers to drop from")
    return blocks


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the transformer blocks ``keep`` (indices, increasing) of ``model``, in place.

    The kept blocks are the same modules (their weights untouched); their ``layer_idx``
    attributes (cache slots) are renumbered; ``config.num_hidden_layers`` and every per-layer list
    in the config (one entry per layer) shrink to match. Returns ``model``. A Transformers model
    whose class, built from the new config, would not take the kept weights (``check_rebuilds``)
    is refused before anything changes.
    """
    name, stack = _blocks(model)
    total = len(stack)
    keep = check_keep(list(keep), total)
    config = getattr(model, "config", None)
    if config is not None and hasattr(type(model), "config_class"):  # a Transformers model
        check_rebuilds(model, name, keep)
    kept = nn.ModuleList([stack[i] for i in keep])
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, kept)
    if config is not None:
        shrink_config(config, keep, total)
    return model


def shrink_config(config, keep: list[int], total: int) -> None:
    """In place: the layer count, and every per-layer list (one entry per layer) cut to ``keep``."""
    for key, value in list(config.to_diff_dict().items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def check_rebuilds(model: nn.Module, name: str, keep: list[int]) -> None:
    """Refuse a drop whose result would not reload: the model class built from the shrunk config
    (on the meta device: no memory) must have exactly the kept weights' names and shapes."""
    total = len(model.get_submodule(name))
    config = copy.deepcopy(model.config)
    shrink_config(config, keep, total)
    want = {}
    for key, value in model.state_dict().items():
        if key.startswith(name + "."):
            index, _, rest = key[len(name) + 1:].partition(".")
            if int(index) not in keep:
                continue
            key = f"{name}.{keep.index(int(index))}.{rest}"
        want[key] = tuple(value.shape)
    with torch.device("meta"):
        rebuilt = {k: tuple(v.shape) for k, v in type(model)(config).state_dict().items()}
    if rebuilt == want:
        return
    missing = sorted(set(rebuilt) - set(want))
    extra = sorted(set(want) - set(rebuilt))
    shape = sorted(k for k in set(want) & set(rebuilt) if want[k] != rebuilt[k])
    what = (f"'{extra[0]}' would be dropped on loading" if extra else
            f"'{missing[0]}' would be new" if missing else f"'{shape[0]}' changes shape")
    first = f"{name}.0."
    hint = " (its first layer is built differently: keep layer 0)" if keep[0] != 0 and any(
        k.startswith(first) for k in extra + missing + shape) else ""
    raise ObertError(f"{type(model).__name__} cannot hold layers {', '.join(map(str, keep))} as "
                     f"they are: {what}{hint}")
