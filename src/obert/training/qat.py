"""Quantisation-aware training to the sparse runtime's int8 scheme.

The layers ``obert compile --dtype int8`` quantises (targets that are dense or pruned in whole
blocks of 4: ``runtime.compile.int8_layers``) are trained with fake quantisation that is exactly
the runtime's arithmetic, so the compiled model computes what was trained:

* weights: per output row, symmetric, ``q = clamp(round(w / s_n), -127, 127)`` with
  ``s_n = max_k |w_nk| / 127`` (a max-abs observer, recomputed at every step: the scale the
  compiler derives from the final weights is then the one trained with);
* inputs: per token, asymmetric unsigned 8-bit, as the kernels quantise them
  (``runtime.linear.quantize_tokens``);
* gradients pass both roundings unchanged (straight-through estimator), and the masks keep
  pruned weights at exactly zero (zero rounds to zero).

At the end the weights are replaced by their int8 grid values ``q s_n``; the input quantisation
stays on the modules until ``remove`` (the final evaluation sees the int8 model).
"""

from __future__ import annotations

from transformers import TrainerCallback

from obert.runtime.compile import int8_layers
from obert.runtime.fake_quant import bake, fake_quantize, remove
from obert.training.schedule import steps_per_epoch

__all__ = ["QATCallback", "bake", "fake_quantize", "remove"]


class QATCallback(TrainerCallback):
    """Fake quantisation from ``start_epoch`` on (at the first optimizer step of that epoch),
    weights baked onto the grid when training ends."""

    def __init__(self, start_epoch: float, *, inputs: bool = True, include: list[str] | None = None,
                 exclude: list[str] | None = None, log=print) -> None:
        self.start_epoch = start_epoch
        self.inputs = inputs
        self.include, self.exclude = include, exclude
        self.log = log
        self.layers: list[str] = []
        self._start_step = 0
        self._active = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        spe = steps_per_epoch(state.max_steps, args.num_train_epochs)
        self._start_step = round(self.start_epoch * spe)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.active and state.global_step >= self._start_step:
            self._activate(model)

    @property
    def active(self) -> bool:
        return self._active

    def _activate(self, model) -> None:
        self._active = True
        self.layers = int8_layers(model, self.include, self.exclude)
        fake_quantize(model, self.layers, self.inputs)
        if self.layers:
            self.log(f"[obert] quantisation-aware training of {len(self.layers)} int8 layers "
                     f"from epoch {self.start_epoch:g}")
        else:
            self.log("[obert] note: no layer is dense or pruned in blocks of 4 for the int8 kernels: "
                     "nothing to quantise (prune with structure block4)")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.active:  # starts at the very end: quantise what there is
            self._activate(model)
        bake(model, self.layers)

    def record(self) -> dict:
        """What ``quantization.json`` holds."""
        return {"scheme": {"weights": "int8, per output row, symmetric, scale max|w|/127",
                           "inputs": "uint8 per token, asymmetric (the runtime's)" if self.inputs
                           else "float32"},
                "start_epoch": self.start_epoch, "layers": self.layers}
