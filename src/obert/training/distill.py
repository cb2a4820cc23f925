"""Knowledge distillation from a dense teacher.

``loss = (1 - hardness) * task_loss + hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
the KL averaged over examples (and over the output keys: ``logits`` for classification,
``start_logits``/``end_logits`` for question answering, as the task loss averages them). Token
logits (masked LM: batch x tokens x vocabulary) average over the tokens the attention mask keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from obert.errors import ObertError
from obert.model.heads import IGNORE_INDEX

DISTILL_KEYS = ("logits", "start_logits", "end_logits")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last dimension, mean over rows; for
    token logits (3 dimensions) with a ``mask`` (batch x tokens, 1 = real token), over the real
    tokens only (padding has no distribution worth learning)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if mask is not None and student_logits.dim() == 3:
        keep = mask.bool()
        s, t = s[keep], t[keep]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def distillation_loss(task_loss: Tensor | None, student_out, teacher_out, hardness: float,
                      temperature: float, mask: Tensor | None = None) -> Tensor:
    """Mix of the task loss and the KD loss over the logits both outputs share (``mask``: the
    attention mask, for token logits)."""
    keys = [k for k in DISTILL_KEYS if getattr(student_out, k, None) is not None
            and getattr(teacher_out, k, None) is not None]
    if not keys:
        raise ObertError("student and teacher outputs share no logits to distill")
    kd = torch.stack([kd_loss(student_out[k], teacher_out[k], temperature, mask) for k in keys]).mean()
    return mixed_loss(task_loss, kd, hardness)


def masked_token_distillation_loss(task_loss: Tensor | None, student_logits: Tensor,
                                   teacher_logits: Tensor, labels: Tensor, hardness: float,
                                   temperature: float) -> Tensor:
    """Masked LM, distilled at the masked tokens only (``labels != -100``): logits either for
    those tokens alone (``[N, V]``, heads run there) or for all (``[batch, tokens, V]``)."""
    keep = labels != IGNORE_INDEX
    s, t = (x if x.dim() == 2 else x[keep] for x in (student_logits, teacher_logits))
    return mixed_loss(task_loss, kd_loss(s, t, temperature), hardness)


def mixed_loss(task_loss: Tensor | None, kd: Tensor, hardness: float) -> Tensor:
    """``(1 - hardness) * task_loss + hardness * kd`` (the task loss unused at hardness 1)."""
    if hardness >= 1.0:
        return kd
    if task_loss is None:
        raise ObertError("hardness < 1 mixes in the task loss: the batch needs labels")
    return (1.0 - hardness) * task_loss + hardness * kd
