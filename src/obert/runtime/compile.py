"""Compile a pruned Hugging Face model for sparse CPU inference, and save/load the compiled form.

``compile(model)`` swaps every prunable Linear (``obert.model.targets``) whose sparsity reaches
``min_sparsity`` for a ``SparseLinear``, if the sparse kernel beats dense torch on this CPU
(``choose.py``: timed per layer, cached per CPU); denser or slower layers stay dense. By
default the threshold is where the kernels can start to win (docs/benchmarks.md): 70% for
float32; none for int8 block4 (the native int8 kernels beat dense float32 torch even on dense
weights, 1.1-1.2x with AVX2 and 1.9-3x with AVX-512 VNNI; the PyTorch fallback needs 50%). The
report says which kernel path runs, which layers run sparse and why the others do not, and
how much of the Linear work now runs sparsely, so a fall-back to dense is never silent. The
choice is the compiling CPU's: a compiled model keeps it when loaded elsewhere (compile again
on the machine that serves it to choose for that one).

Saved form (``save_compiled``): ``config.json`` (+ tokenizer files when given), ``sparse_model.safetensors``
holding the dense parameters of everything else and, per compiled layer, only its non-zeros and
their indices, and ``obert_runtime.json`` naming the compiled layers. ``load_compiled`` rebuilds the
model from the config and puts the runtime modules back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

from obert.errors import ObertError
from obert.io import atomic_dir
from obert.core.quantize import smoothing_factors
from obert.model.targets import find_targets
from obert import native as kernels
from obert.runtime.calibrate import InputStats, input_stats
from obert.runtime.choose import CHOICES, DEFAULT_TOKENS, Chooser
from obert.runtime.attention import NAME as ATTENTION, use_fast_attention
from obert.runtime.linear import SparseFFN, SparseLinear, is_block4
from obert.runtime.norm import AddNorm, is_output_block

FP32_MIN_SPARSITY = 0.7
INT8_MIN_SPARSITY = 0.0  # every block4 layer: a dense one is block4 too, and int8 beats fp32
FALLBACK_INT8_MIN_SPARSITY = 0.5  # without the native kernels (PyTorch fallback): only sparse ones

RUNTIME_FILE = "obert_runtime.json"
WEIGHTS_FILE = "sparse_model.safetensors"


@dataclass
class CompileReport:
    """Which layers run sparse, and the share of the Linear multiply-adds they carry."""

    sparse_layers: list[str] = field(default_factory=list)
    dense_layers: list[str] = field(default_factory=list)
    float32_layers: list[str] = field(default_factory=list)  # asked for int8, not block4
    kinds: dict[str, str] = field(default_factory=dict)  # "int8" / "float32" kernel of each candidate
    linear_macs: int = 0  # multiply-adds per token of all target Linear layers, dense
    sparse_macs: int = 0  # of those, the ones left after pruning in compiled layers
    compiled_dense_macs: int = 0  # dense multiply-adds per token of the compiled layers
    fused_activations: list[str] = field(default_factory=list)  # layers that apply GELU themselves
    fused_ffn: list[str] = field(default_factory=list)  # blocks whose two FFN layers run as one
    fast_attention: bool = False  # attention runs on obert's kernel (runtime/attention.py)
    fused_norms: list[str] = field(default_factory=list)  # output blocks: add + LayerNorm in one pass
    int8_rounding: str = "nearest"  # int8 weights: rounded to nearest, or "obs" (calibrated)
    smoothed: list[str] = field(default_factory=list)  # int8 layers with smoothed inputs
    kernels: str = ""  # instruction-set path of the native kernels, or "pytorch-fallback"
    choice: str = "speed"  # how layers were chosen: "speed" (measured) or "sparsity"
    sparsity: dict[str, float] = field(default_factory=dict)  # every target layer's
    speedups: dict[str, float] = field(default_factory=dict)  # measured sparse / dense speed
    slower_layers: list[str] = field(default_factory=list)  # sparse enough, dense torch faster
    not_float32: list[str] = field(default_factory=list)  # weights in another dtype: left as they are

    @property
    def sparse_fraction(self) -> float:
        """Fraction of the target Linear work (dense multiply-adds) handled by sparse kernels."""
        return self.compiled_dense_macs / max(self.linear_macs, 1)

    def check(self, source: str, dtype: str, *, dtype_name: str = "--dtype",
              structure_name: str = "--structure") -> None:
        """One line when compiling ``source`` left nothing to run sparse, or nothing int8 under
        ``dtype="int8"`` (the names say where the user sets dtype and structure)."""
        if not self.sparse_layers and not self.slower_layers:
            raise ObertError(f"no Linear layer of {source} reaches the sparsity threshold: "
                             "nothing to compile")
        if dtype == "int8" and "int8" not in self.kinds.values():
            raise ObertError(f"{dtype_name} int8 quantises layers that are dense or pruned in "
                             f"blocks of 4, and {source} has none (prune with {structure_name} "
                             "block4): compile it as float32")

    def summary(self) -> str:
        total = len(self.sparse_layers) + len(self.dense_layers)
        where = "on the PyTorch fallback (no native kernels here: slow)" \
            if self.kernels == "pytorch-fallback" else f"on the {self.kernels} kernels"
        text = (f"{len(self.sparse_layers)} of {total} Linear layers run sparse {where} "
                f"({100 * self.sparse_fraction:.1f}% of their dense work; "
                f"{self.sparse_macs / max(self.compiled_dense_macs, 1):.3f} density where compiled)")
        if self.slower_layers:
            text += (f"; {len(self.slower_layers)} sparse enough but kept dense, where dense torch "
                     "is faster on this CPU")
        if self.slower_layers and not self.sparse_layers:
            text += " (every one: the model runs as fast as dense, not faster)"
        return text

    @property
    def int8_layers(self) -> list[str]:
        return [n for n in self.sparse_layers if self.kinds.get(n) == "int8"]

    def why(self, name: str) -> str:
        """Why layer ``name`` runs sparse or dense."""
        speed = self.speedups.get(name)
        timed = f", {speed:.2f}x dense torch here" if speed is not None else ""
        if name in self.sparse_layers:
            return f"sparse ({self.kinds[name]}{timed})"
        if name in self.slower_layers:
            return f"dense (the {self.kinds[name]} sparse kernel runs at{timed.lstrip(',')})"
        if name in self.not_float32:
            return "dense (weights not float32: compile a float32 model)"
        return "dense (below the sparsity threshold)"

    def layer_table(self) -> str:
        """One line per target layer: sparsity, the decision and why."""
        names = list(self.sparsity)
        width = max((len(n) for n in names), default=0)
        return "\n".join(f"  {n:<{width}}  {100 * self.sparsity[n]:5.1f}% sparse  {self.why(n)}"
                         for n in names)

    def as_dict(self) -> dict:
        return {**asdict(self), "sparse_fraction": self.sparse_fraction, "int8_layers": self.int8_layers}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def compile(model: nn.Module, *, min_sparsity: float | None = None, dtype: str = "float32",
            include: list[str] | None = None, exclude: list[str] | None = None,
            group: int | None = None, fuse: bool = True, attention: bool = True,
            calibration: Iterable[dict] | None = None, smooth: float = 0.5, choose: str = "speed",
            tokens: int = DEFAULT_TOKENS, chooser: Chooser | None = None,
            trained_int8: list[str] | None = None) -> CompileReport:
    """Swap sparse Linear layers of ``model`` (in place, eval mode) for ``SparseLinear``.

    ``fuse``: fold a GELU that follows a compiled layer into its kernel (see ``_fuse_activations``)
    and run a feed-forward block whose two layers are both compiled as one ``SparseFFN``
    (``_fuse_ffn``), and do BERT output blocks' residual add and LayerNorm in one pass
    (``norm.AddNorm``). ``attention``: switch the model's attention to obert's CPU kernel
    (``attention.use_fast_attention``; cases it does not cover still run PyTorch's SDPA).

    ``dtype="int8"`` quantises the layers that are dense or block4-structured (others run sparse
    in float32 where they reach its threshold; the report lists them under ``float32_layers``),
    and every layer of ``trained_int8`` (what quantisation-aware training put on the int8 grid,
    ``quantization.json``), whatever its pattern of zeros. ``min_sparsity``: one threshold for
    every layer instead of the per-kernel defaults. ``calibration`` (int8): batches of model inputs (dicts
    with ``input_ids`` and optionally ``attention_mask``, ...) whose Linear inputs give each int8
    layer's Hessian for OBS rounding of its weights (``quantize.obs_quantize``) instead of
    rounding to nearest, and the per-channel input maxima for smoothing its input with strength
    ``smooth`` (``quantize.smoothing_factors``' alpha; 0 turns smoothing off). A few hundred
    sequences of the task's text are plenty.

    ``choose="speed"`` times every layer that reaches the threshold both ways on this CPU
    (``tokens`` random inputs; ``choose.Chooser``, cached per CPU) and keeps it dense where
    dense torch is at least as fast; ``choose="sparsity"`` compiles every such layer untimed.
    """
    if calibration is not None and dtype != "int8":
        raise ObertError("calibration rounds int8 weights: use it with dtype='int8'")
    if choose not in CHOICES:
        raise ObertError(f"choose must be one of {', '.join(CHOICES)}, got '{choose}'")
    model.eval()
    report = CompileReport(kernels=kernels.isa() if kernels.native_available() else "pytorch-fallback",
                           choice=choose)
    if choose == "speed" and chooser is None:
        chooser = Chooser(tokens)
    plan = []  # (target, nnz, int8) of the layers to compile
    for t in find_targets(model, include, exclude):
        w = t.module.weight
        macs = w.numel()
        report.linear_macs += macs
        nnz = int((w != 0).sum())
        report.sparsity[t.name] = 1.0 - nnz / macs
        sparse, int8 = layer_kind(w, dtype, group, min_sparsity)
        if dtype == "int8" and t.name in (trained_int8 or ()) and w.shape[1] % 4 == 0:
            sparse = int8 = True  # on the grid already: rounding zeros may break the blocks
        if sparse:
            plan.append((t, nnz, int8))
        else:
            report.dense_layers.append(t.name)
            if w.dtype != torch.float32:
                report.not_float32.append(t.name)
    for t, _, int8 in plan:
        report.kinds[t.name] = "int8" if int8 else "float32"
    timed: dict[str, SparseLinear] = {}  # layers built to be timed, kept when nothing changes them
    if choose == "speed":  # before calibration: its statistics are only needed for the winners
        for t, _, int8 in plan:
            timed[t.name] = _build(t, int8, group)
        plan = [p for p in plan if _faster_sparse(p[0], timed[p[0].name], chooser, report)]
    stats: dict[str, InputStats] = {}
    smoothing: dict[str, torch.Tensor] = {}
    to_quantize = [t for t, _, q in plan if q]
    if calibration is not None and to_quantize:
        stats = input_stats(model, calibration, [t.name for t in to_quantize])
        report.int8_rounding = "obs"
        if smooth > 0:
            smoothing = _smoothing(to_quantize, stats, smooth)
            report.smoothed = list(smoothing)
    for t, nnz, int8 in plan:
        macs = t.module.weight.numel()
        st = stats.get(t.name)
        if t.name in timed and st is None and t.name not in smoothing:
            layer = timed[t.name]
        else:
            layer = _build(t, int8, group, None if st is None else st.hessian, smoothing.get(t.name))
        if dtype == "int8" and not int8:
            report.float32_layers.append(t.name)
        _set_module(model, t.name, layer)
        report.sparse_layers.append(t.name)
        report.sparse_macs += nnz
        report.compiled_dense_macs += macs
    if chooser is not None:
        chooser.save()
    if fuse:
        _fuse_activations(model, report)
        report.fused_ffn = _fuse_ffn(model)
        report.fused_norms = _fuse_norms(model)
    if attention:
        report.fast_attention = use_fast_attention(model)
    return report


def _build(target, int8: bool, group: int | None, hessian: torch.Tensor | None = None,
           smooth: torch.Tensor | None = None) -> SparseLinear:
    """The sparse form of a target layer (int8: rounded to nearest unless given its Hessian)."""
    if int8:
        # group 4 given: a trained int8 layer's rounding zeros need not fill whole blocks
        return SparseLinear.from_linear(target.module, dtype="int8", group=4, smooth=smooth,
                                        hessian=hessian)
    return SparseLinear.from_linear(target.module, group=group)


def _faster_sparse(target, layer: SparseLinear, chooser: Chooser, report: CompileReport) -> bool:
    """Whether ``layer`` (the target's sparse form; calibration changes its values, not its
    speed) beats dense torch here; a loser is reported as kept dense."""
    report.speedups[target.name] = chooser.timing(target.module, layer).speedup
    if report.speedups[target.name] > 1.0:
        return True
    report.dense_layers.append(target.name)
    report.slower_layers.append(target.name)
    return False


def _smoothing(targets: list, stats: dict[str, InputStats], alpha: float) -> dict[str, torch.Tensor]:
    """Each int8 layer's smoothing factors from its input's channel maxima and its weights."""
    return {t.name: smoothing_factors(stats[t.name].absmax, t.module.weight.detach().abs().amax(0).cpu(),
                                      alpha).float() for t in targets}


def _is_exact_gelu(act) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _fuse_activations(model: nn.Module, report: CompileReport) -> None:
    """BERT-style feed-forward blocks (``dense`` then ``intermediate_act_fn``, exact GELU): the
    sparse layer applies the GELU in its output pass and the activation module becomes Identity,
    saving one read and write of the largest activation tensor."""
    for name, mod in model.named_modules():
        dense = getattr(mod, "dense", None)
        if isinstance(dense, SparseLinear) and dense.activation is None and \
                _is_exact_gelu(getattr(mod, "intermediate_act_fn", None)):
            dense.activation = "gelu"
            mod.intermediate_act_fn = nn.Identity()
            report.fused_activations.append(f"{name}.dense" if name else "dense")


def _ffn_pair(block: nn.Module) -> tuple[SparseLinear, SparseLinear] | None:
    """BERT-style layer (``intermediate.dense`` with its GELU fused, then ``output.dense``): the
    two sparse layers when they can run as one fused block, else None."""
    inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
    fc1, fc2 = getattr(inter, "dense", None), getattr(out, "dense", None)
    if isinstance(fc1, SparseLinear) and isinstance(fc2, SparseLinear) and \
            isinstance(getattr(inter, "intermediate_act_fn", None), nn.Identity) and \
            fc1.activation is not None and fc1.quantized == fc2.quantized and \
            fc1.out_features == fc2.in_features:
        return fc1, fc2
    return None


def _install_ffn(model: nn.Module, name: str, fc1: SparseLinear, fc2: SparseLinear) -> None:
    """``intermediate.dense`` becomes the fused block (returning the block's output) and
    ``output.dense`` an Identity, so the layer's residual add and LayerNorm run unchanged."""
    prefix = f"{name}." if name else ""
    _set_module(model, f"{prefix}intermediate.dense", SparseFFN(fc1, fc2))
    _set_module(model, f"{prefix}output.dense", nn.Identity())


def _fuse_ffn(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Run the feed-forward blocks of BERT-style layers (all that can, or the layers ``names``)
    as one ``SparseFFN`` each."""
    if names is None:
        names = [n for n, m in model.named_modules() if _ffn_pair(m)]
    for name in names:
        pair = _ffn_pair(model.get_submodule(name))
        if pair is None:
            raise ObertError(f"'{name}' has no fusable sparse feed-forward block")
        _install_ffn(model, name, *pair)
    return names


def _fuse_norms(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Swap BERT-style output blocks (all of them, or ``names``) for ``AddNorm``."""
    if names is None:
        names = [n for n, m in model.named_modules() if is_output_block(m)]
    for name in names:
        _set_module(model, name, AddNorm(model.get_submodule(name)))
    return names


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def layer_kind(w: torch.Tensor, dtype: str, group: int | None = None,
               min_sparsity: float | None = None) -> tuple[bool, bool]:
    """Whether ``compile`` makes a layer with weight ``w`` sparse (before any speed choice), and
    whether int8: block4-structured under ``dtype="int8"``; sparse from ``min_sparsity`` or the
    kernel's default threshold, float32 weights only."""
    nnz = int((w != 0).sum())
    int8 = dtype == "int8" and group in (None, 4) and w.shape[1] % 4 == 0 and is_block4(w)
    if min_sparsity is not None:
        threshold = min_sparsity
    elif int8:  # the measured win of int8 at any sparsity is the native kernels'
        threshold = INT8_MIN_SPARSITY if kernels.native_available() else FALLBACK_INT8_MIN_SPARSITY
    else:
        threshold = FP32_MIN_SPARSITY
    return 1.0 - nnz / w.numel() >= threshold and w.dtype == torch.float32, int8


def trained_layers(path: str | Path) -> list[str] | None:
    """The layers quantisation-aware training put on the int8 grid (``quantization.json`` beside
    the model at ``path``), or None when it was not trained so."""
    record = Path(path) / "quantization.json"
    if not record.is_file():
        return None
    try:
        layers = json.loads(record.read_text())["layers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ObertError(f"{record}: not a quantization record ({exc})") from None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise ObertError(f"{record}: 'layers' must be a list of layer names")
    return layers


def int8_layers(model: nn.Module, include: list[str] | None = None,
                exclude: list[str] | None = None, min_sparsity: float | None = None) -> list[str]:
    """The target layers ``compile(dtype="int8", choose="sparsity")`` quantises to int8."""
    return [t.name for t in find_targets(model, include, exclude)
            if all(layer_kind(t.module.weight.detach(), "int8", None, min_sparsity))]


def compiled_card(title: str, source: str, report: "CompileReport", dtype: str) -> str:
    """The model card of a compiled model: what compile chose per layer, on which kernels."""
    from obert.card import model_card

    return model_card(title, source=source, what=[
        f"compiled for obert's sparse CPU runtime ({dtype}; load with "
        f"`obert.runtime.load_compiled`): {report.summary()}",
        "per layer:\n\n```\n" + report.layer_table() + "\n```"])


def save_compiled(model: nn.Module, out: str | Path, tokenizer=None, *, overwrite: bool = False,
                  extra: dict[str, str] | None = None) -> Path:
    """Write the compiled model atomically (see the module docstring for the files), with the
    text files ``extra`` (name -> text, e.g. the model card); an earlier obert output at ``out``
    is replaced only with ``overwrite``."""
    layers = sparse_modules(model)
    compiled = layers or any(isinstance(m, AddNorm) for m in model.modules()) or \
        getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION
    if not compiled:
        raise ObertError("the model is not compiled (run obert.runtime.compile first)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ffn = [n.removesuffix("intermediate.dense").rstrip(".") for n, m in model.named_modules()
           if isinstance(m, SparseFFN)]
    meta = {"format": 1, "architectures": getattr(model.config, "architectures", None),
            "model_class": type(model).__name__, "ffn": ffn,
            "fast_attention": getattr(model.config, "_attn_implementation", None) == ATTENTION,
            "fused_norms": [n for n, m in model.named_modules() if isinstance(m, AddNorm)],
            "layers": {n: {"in_features": m.in_features, "out_features": m.out_features,
                           "group": m.group, "chunk": m.chunk, "bias": m.bias is not None,
                           "int8": m.quantized, "activation": m.activation}
                       for n, m in layers.items()}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / RUNTIME_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def load_compiled(path: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_compiled``: config, runtime modules, weights."""
    import transformers

    path = Path(path)
    if not (path / RUNTIME_FILE).is_file():
        raise ObertError(f"{path} is not a compiled obert model (no {RUNTIME_FILE})")
    meta = json.loads((path / RUNTIME_FILE).read_text())
    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise ObertError(f"unknown model class {meta['model_class']}")
    model = cls(config)  # on CPU: non-persistent buffers (position ids) get their real values
    state = load_file(str(path / WEIGHTS_FILE))
    modules = {}
    for name, spec in meta["layers"].items():
        prefix = name + "."
        modules[name] = SparseLinear(spec["in_features"], spec["out_features"], state[prefix + "seg_ptr"],
                                     state[prefix + "col"], state[prefix + "val"],
                                     state.get(prefix + "bias") if spec["bias"] else None,
                                     spec["group"], spec["chunk"], state.get(prefix + "w_scale"),
                                     state.get(prefix + "row_sum"), spec.get("activation"),
                                     state.get(prefix + "in_mul"))
    # A fused block's two layers are saved under it: put them back where compile found them and
    # fuse again, as compile does.
    for block in meta.get("ffn", []):
        prefix = f"{block}." if block else ""
        modules[f"{prefix}intermediate.dense"] = modules.pop(f"{prefix}intermediate.dense.fc1")
        modules[f"{prefix}output.dense"] = modules.pop(f"{prefix}intermediate.dense.fc2")
    for name, module in modules.items():
        _set_module(model, name, module)
        if module.activation is not None:  # the fused activation module is an Identity now
            parent = name.rpartition(".")[0]
            _set_module(model, f"{parent}.intermediate_act_fn" if parent else "intermediate_act_fn",
                        nn.Identity())
    _fuse_ffn(model, meta.get("ffn", []))
    _fuse_norms(model, meta.get("fused_norms", []))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ObertError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if meta.get("fast_attention"):
        use_fast_attention(model)
    return model.eval()
