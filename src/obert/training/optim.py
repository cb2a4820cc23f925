"""The M-FAC optimizer: gradients preconditioned by the inverse empirical Fisher of the last m
gradients (the dynamic algorithm of Frantar, Kurtic, Alistarh, NeurIPS 2021)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import Tensor

from obert.core.mfac import SlidingFisher
from obert.device import GiB, available_memory
from obert.errors import ObertError
from obert.pruning.settings import Settings


class MFACSettings(Settings):
    """The M-FAC optimizer's own settings (``training.mfac`` in a recipe)."""

    num_grads: int = Field(32, gt=0, description="m: gradients in the sliding window (memory: m "
                                                 "copies of the trainable parameters)")
    damp: float = Field(1e-6, gt=0, description="Fisher damping lambda (the paper's fine-tuning "
                                                "runs: 1e-6)")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum on the "
                                                          "preconditioned step")


def window_bytes(num_params: int, num_grads: int, dtype: torch.dtype = torch.float32) -> int:
    """Memory of the sliding window: ``m d`` gradients, the ``m x m`` Gram matrix, one step."""
    return dtype.itemsize * (num_grads * num_params + num_grads * num_grads + 2 * num_params)


class MFACOptimizer(torch.optim.Optimizer):
    """``p <- p - lr * u`` with ``u = F^-1 g`` (plus momentum): ``F = damp I + (1/m) sum g_i g_i^T``
    over the last ``num_grads`` gradients of all parameters together (the current one included),
    one Fisher for every parameter group; ``lr`` and decoupled ``weight_decay``
    (``p <- p (1 - lr wd)``) per group. ``O(d m + m^2)`` per step plus ``O(d m + m^3)`` for the
    swapped gradient. The window is allocated at the first step, on the gradients' device, after
    a memory check; it is part of ``state_dict`` (resumable). The step's size grows with the
    window: for a gradient in its span ``|F^-1 g|`` is about ``m / |g|``, so the M-FAC paper's
    lr 1e-4 at m = 1,024 is about 3e-3 at m = 32."""

    def __init__(self, params: Iterable, lr: float = 1e-4, *, num_grads: int = 32, damp: float = 1e-6,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        MFACSettings(num_grads=num_grads, damp=damp, momentum=momentum)  # the same checks as recipes
        if not lr > 0 or weight_decay < 0:
            raise ObertError(f"lr must be positive and weight_decay non-negative, got {lr}, {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.num_grads, self.damp, self.momentum = num_grads, damp, momentum
        self._window: SlidingFisher | None = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _state(self) -> dict:
        """The window lives in the first parameter's state, so ``state_dict`` carries it."""
        return self.state[self._params()[0]]

    def _ensure_window(self, ref: Tensor) -> SlidingFisher:
        if self._window is not None:
            return self._window
        d = sum(p.numel() for p in self._params())
        need = window_bytes(d, self.num_grads, torch.float32)
        free = available_memory(ref.device)
        if need > 0.8 * free:
            raise ObertError(f"the M-FAC window of {self.num_grads} gradients of {d:,} parameters "
                             f"needs {need / GiB:.2f} GiB, {free / GiB:.2f} GiB free: lower "
                             "num_grads")
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        window = SlidingFisher(d, self.num_grads, self.damp, dtype=dtype, device=ref.device)
        saved = self._state().get("mfac_window")
        if saved is not None:
            window.load_state_dict({k: saved[k] for k in ("grads", "gram", "next", "seen")})
        self._window = window
        return window

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._window = None  # rebuilt from the loaded state at the next step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        window = self._ensure_window(grads[0])
        flat = torch.cat([g.reshape(-1).to(window.grads.dtype) for g in grads])
        window.add(flat)
        update = window.ihvp(flat)
        state = self._state()
        if self.momentum:
            buf = state.get("momentum_buffer")
            update = update if buf is None else buf.mul_(self.momentum).add_(update)
            state["momentum_buffer"] = update
        state["mfac_window"] = window.state_dict()
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                n = p.numel()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update[offset: offset + n].reshape(p.shape).to(p.dtype), alpha=-group["lr"])
                offset += n
        return loss


__all__ = ["MFACOptimizer", "MFACSettings", "window_bytes"]
