"""Masked-LM heads at the labelled positions only: the same loss and gradients as the full head."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from obert.model.heads import labelled_positions_only, mlm_head


def _mlm(family: str):
    from transformers import (AlbertConfig, AlbertForMaskedLM, AutoModelForMaskedLM, ElectraConfig,
                              ElectraForMaskedLM)

    torch.manual_seed(0)
    if family == "electra":
        return ElectraForMaskedLM(ElectraConfig(vocab_size=40, embedding_size=16, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=64))
    if family.startswith("deberta-v2"):  # the legacy head (cls) and the newer one (lm_predictions)
        from transformers import DebertaV2Config, DebertaV2ForMaskedLM

        return DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64,
                                                    legacy=family.endswith("legacy")))
    if family == "albert":
        return AlbertForMaskedLM(AlbertConfig(vocab_size=40, embedding_size=16, hidden_size=32,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, max_position_embeddings=64))
    return AutoModelForMaskedLM.from_config(tiny_config(family))


def _batch(vocab: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(3, 12, generator=g) < 0.3
    chosen[0, 0] = True  # at least one labelled position
    labels[chosen] = torch.randint(5, vocab, (int(chosen.sum()),), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "albert", "deberta-v2-legacy",
                                    "deberta-v2"])
def test_same_loss_gradients_and_labelled_logits(family):
    model = _mlm(family).double().eval()
    assert mlm_head(model) is not None
    batch = _batch(model.config.vocab_size)
    full, full_grads = _loss_and_grads(model, batch)
    with labelled_positions_only(model):
        part, part_grads = _loss_and_grads(model, batch)
    chosen = batch["labels"] != -100
    assert part.logits.shape == (int(chosen.sum()), model.config.vocab_size)
    torch.testing.assert_close(part.logits, full.logits[chosen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-12, atol=1e-12)
    assert part_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(part_grads[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_calls_without_labels_and_after_the_block_are_unchanged():
    model = _mlm("bert").eval()
    batch = _batch(model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
        with labelled_positions_only(model):
            inside = model(**inputs).logits
            model(**batch)  # a labelled call leaves nothing behind for the next one
            again = model(**inputs).logits
        after = model(**batch).logits
    assert inside.shape == again.shape == after.shape == ref.shape
    torch.testing.assert_close(inside, ref)
    torch.testing.assert_close(again, ref)


def test_other_models_are_left_alone():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert")).eval()
    assert mlm_head(model) is None
    batch = {**{k: v for k, v in _batch(model.config.vocab_size).items() if k != "labels"},
             "labels": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        ref = model(**batch)
        with labelled_positions_only(model):
            got = model(**batch)
    torch.testing.assert_close(got.logits, ref.logits)
    torch.testing.assert_close(got.loss, ref.loss)


def test_a_wrapped_model_is_reached_through_module():
    model = _mlm("bert").eval()
    wrapper = torch.nn.Module()
    wrapper.module = model
    batch = _batch(model.config.vocab_size)
    with torch.no_grad(), labelled_positions_only(wrapper):
        got = model(**batch).logits
    assert got.shape[0] == int((batch["labels"] != -100).sum())


def test_the_pruning_loss_runs_the_head_on_the_masked_tokens_only():
    from obert.pruning.fisher import task_loss

    model = _mlm("bert").eval()
    batch = _batch(model.config.vocab_size)
    rows = []
    handle = mlm_head(model).register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1]))
    with torch.no_grad():
        got = task_loss(model, batch, torch.device("cpu"))
        ref = model(**batch).loss
    handle.remove()
    assert rows == [(int((batch["labels"] != -100).sum()),), (3, 12)]
    torch.testing.assert_close(got, ref)
