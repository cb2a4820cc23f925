"""Where work runs and how much memory it has there."""

from __future__ import annotations

import psutil
import torch

from obert.errors import ObertError

GiB = 1024**3


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present unless told otherwise; a device that is not there is a one-line error."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ObertError(f"device '{device}' is not a device name (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ObertError(f"device '{device}': CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise ObertError(f"device '{device}': this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ObertError(f"device '{device}': MPS is not available on this machine")
    elif dev.type not in ("cpu", "mps"):
        raise ObertError(f"device '{device}': obert runs on cpu, cuda or mps")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free for Fisher blocks on ``device``.

    On CUDA that is the driver's free memory plus what PyTorch's caching allocator holds
    without using (after training steps the cache can hold most of the card, and it is
    reused for our allocations before the driver is asked for more).
    """
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available
