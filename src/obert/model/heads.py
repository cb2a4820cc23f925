"""Masked-LM heads evaluated at the labelled positions only.

A masked-LM loss reads the vocabulary logits of the masked tokens (``labels != -100``, about 15%
of them), but Hugging Face models compute the logits of every token first: with a 30k-word
vocabulary the head costs about as much as a small encoder, forward and backward. Inside
``labelled_positions_only(model)`` a masked-LM model given ``labels`` runs its head on the
labelled positions only; the loss and every gradient are the same, and ``logits`` become
``[labelled tokens, vocabulary]`` (the positions in row-major order, as ``logits[labels != -100]``
would give). Calls without labels, and models of other kinds, are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from obert.errors import ObertError

IGNORE_INDEX = -100  # the label of unmasked positions (``DataCollatorForLanguageModeling``)
# The attribute of ``...ForMaskedLM`` models whose first input is the encoder's hidden states, by
# architecture: BERT, DeBERTa legacy (cls); RoBERTa, XLM-R (lm_head); DistilBERT (vocab_transform,
# the first of its four head modules); ELECTRA generator; DeBERTa-v2; ALBERT (predictions).
MLM_HEADS = ("cls", "lm_head", "vocab_transform", "generator_predictions", "lm_predictions",
             "predictions")


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The head module of a Hugging Face masked-LM model (see ``MLM_HEADS``), or None for other
    models (sequence classifiers, bare encoders, masked-LM architectures not listed)."""
    if not type(model).__name__.endswith("ForMaskedLM"):
        return None
    for name in MLM_HEADS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@contextlib.contextmanager
def labelled_positions_only(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model(..., labels=labels)`` computes the head at the positions where
    ``labels != -100`` only (the loss is unchanged). A no-op for models ``mlm_head`` does not
    know; ``model`` may be wrapped (``.module``, as DDP does)."""
    inner = getattr(model, "module", model)
    head = mlm_head(inner)
    if head is None:
        yield
        return
    keep: list[Tensor] = []

    def select_labels(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is None:
            return None
        chosen = labels != IGNORE_INDEX
        keep.append(chosen)
        return args, {**kwargs, "labels": labels[chosen]}

    def select_positions(module, args):
        if not keep:
            return None
        hidden, chosen = args[0], keep[-1]
        if hidden.shape[:2] != chosen.shape:
            raise ObertError(f"{type(inner).__name__}: the head's input {tuple(hidden.shape)} does not "
                             f"match the labels {tuple(chosen.shape)}")
        return (hidden[chosen], *args[1:])

    def forget(module, args, kwargs, output):
        keep.clear()

    handles = [inner.register_forward_pre_hook(select_labels, with_kwargs=True),
               head.register_forward_pre_hook(select_positions),
               inner.register_forward_hook(forget, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
