"""Layer dropping: the kept layers' weights bit-equal, the config updated for BERT, RoBERTa and
DistilBERT, the output reloads with from_pretrained and computes what the kept layers compute."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_config

from obert.cli.main import main
from obert.errors import ObertError
from obert.model.surgery import drop_layers, evenly_spaced
from obert.model.targets import transformer_blocks


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]  # round(2.2), round(4.4), round(6.6), ...
    assert evenly_spaced(12, 3) == [0, 6, 11]  # round(5.5) = 6 (half to even)
    assert evenly_spaced(6, 3) == [0, 2, 5] and evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(5, 1) == [0] and evenly_spaced(5, 2) == [0, 4]
    for total in range(1, 25):
        for k in range(1, total + 1):
            got = evenly_spaced(total, k)
            assert len(set(got)) == k and got == sorted(got) and got[0] == 0
            assert k == 1 or got[-1] == total - 1
    with pytest.raises(ObertError, match="between 1 and the model's 4 layers, got 5"):
        evenly_spaced(4, 5)


def _model(family: str, head: str, layers: int = 4):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    config = tiny_config(family)
    config.num_hidden_layers = layers  # n_layers for DistilBERT (its attribute map)
    torch.manual_seed(0)
    cls = AutoModelForMaskedLM if head == "mlm" else AutoModelForSequenceClassification
    return cls.from_config(config).eval()


@pytest.mark.parametrize("family,head", [("bert", "cls"), ("distilbert", "cls"), ("roberta", "mlm"),
                                         ("bert", "mlm")])
def test_drop_layers_keeps_weights_and_reloads(family, head, tmp_path):
    model = _model(family, head)
    original = copy.deepcopy(model)
    prefix, _ = transformer_blocks(model)
    keep = [0, 2, 3]
    drop_layers(model, keep)
    assert model.config.num_hidden_layers == 3 and len(transformer_blocks(model)[1]) == 3
    before, after = original.state_dict(), model.state_dict()
    for name, value in after.items():
        if name.startswith(prefix + "."):  # a kept layer: renumbered, bit-equal
            rest = name[len(prefix) + 1:]
            index, _, tail = rest.partition(".")
            source = f"{prefix}.{keep[int(index)]}.{tail}"
            assert torch.equal(value, before[source]), name
        else:  # embeddings, pooler, head: unchanged
            assert torch.equal(value, before[name]), name
    assert len(after) == len(before) - sum(1 for n in before if n.startswith(f"{prefix}.1."))
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_dropped_bert_computes_the_kept_layers_in_order():
    """Independent reference: embeddings, then the original model's layers 0 and 3 called by
    hand, the pooler and the classifier."""
    model = _model("bert", "cls")
    original = copy.deepcopy(model)
    drop_layers(model, [0, 3])
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        hidden = original.bert.embeddings(input_ids=ids)
        for i in (0, 3):
            out = original.bert.encoder.layer[i](hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        want = original.classifier(original.bert.pooler(hidden))
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)


def test_modernbert_layers_follow_their_types_and_layer_0_is_kept(tmp_path):
    """ModernBERT builds layers by position (alternating attention types from ``layer_types``;
    the first layer without an attention norm): the types follow the kept layers, the result
    reloads computing the same logits, and a drop without layer 0 is refused untouched."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    config = ModernBertConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                              num_attention_heads=4, vocab_size=100, num_labels=2, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              global_attn_every_n_layers=3)
    torch.manual_seed(0)
    model = ModernBertForSequenceClassification(config).eval()
    types = list(model.config.layer_types)
    with pytest.raises(ObertError, match=r"cannot hold layers 1, 3, 5 as they are: .*attn_norm.* "
                                         r"\(its first layer is built differently: keep layer 0\)"):
        drop_layers(model, [1, 3, 5])
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    drop_layers(model, [0, 3, 4])
    assert model.config.layer_types == [types[0], types[3], types[4]]
    model.save_pretrained(tmp_path / "m")
    reloaded = ModernBertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(5, 100, (2, 9))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=0, atol=0)


def test_drop_layers_refuses_bad_lists():
    model = _model("bert", "cls")
    for keep, says in (([], "names no layer"), ([0, 4], "--keep 4: the model has layers 0 to 3"),
                       ([2, 1], "increasing order"), ([1, 1], "increasing order"),
                       ([-1], "--keep -1")):
        with pytest.raises(ObertError, match=says):
            drop_layers(model, keep)
    assert model.config.num_hidden_layers == 4  # nothing changed by a refused call


def _saved(tmp_path, family="bert", head="cls"):
    from conftest import make_tokenizer

    out = tmp_path / f"{family}-{head}"
    _model(family, head).save_pretrained(out)
    make_tokenizer(tmp_path).save_pretrained(out)
    return out


def test_cli_drop_layers(tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    src = _saved(tmp_path, "bert", "mlm")
    out = tmp_path / "out"
    assert main(["drop-layers", str(src), "--num-layers", "2", "--out", str(out)]) == 0
    assert "kept layers 0,3 of 4" in capsys.readouterr().out
    model = AutoModelForMaskedLM.from_pretrained(out)  # a masked LM stays a masked LM
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "layers.json").read_text())["kept_layers"] == [0, 3]
    assert AutoTokenizer.from_pretrained(out).vocab == AutoTokenizer.from_pretrained(src).vocab
    assert not (out / "sparsity.json").exists()  # a dense source stays undescribed
    original = AutoModelForMaskedLM.from_pretrained(src)
    for i, j in ((0, 0), (1, 3)):
        a = model.bert.encoder.layer[i].intermediate.dense.weight
        assert torch.equal(a, original.bert.encoder.layer[j].intermediate.dense.weight)


def test_cli_drop_layers_of_a_pruned_model_keeps_its_sparsity_record(tmp_path, data_files,
                                                                     tiny_model_dir):
    pruned = tmp_path / "pruned"
    assert main(["prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(pruned)]) == 0
    out = tmp_path / "out"
    assert main(["drop-layers", str(pruned), "--keep", "1", "--out", str(out)]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    before = json.loads((pruned / "sparsity.json").read_text())
    assert record["method"] == "magnitude" and record["source_model"] == str(pruned)
    assert set(record["layers"]) == {n.replace("layer.1.", "layer.0.") for n in before["layers"]
                                     if "layer.1." in n}
    for name, layer in record["layers"].items():
        assert layer == before["layers"][name.replace("layer.0.", "layer.1.")]


@pytest.mark.parametrize("args,says", [
    ([], "give --keep or --num-layers"),
    (["--keep", "0", "--num-layers", "1"], "give --keep or --num-layers"),
    (["--keep", "a,b"], "--keep expects layer indices like 0,2,4, got 'a,b'"),
    (["--keep", "0,9"], "--keep 9: the model has layers 0 to 3"),
    (["--keep", "2,1"], "--keep must list layers in increasing order"),
    (["--num-layers", "5"], "--num-layers must be between 1 and the model's 4 layers, got 5"),
    (["--num-layers", "0"], "--num-layers"),
])
def test_cli_drop_layers_refuses(args, says, tmp_path, capsys):
    src = _saved(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["drop-layers", str(src), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_cli_drop_layers_refuses_a_decoder(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).save_pretrained(src)
    assert main(["drop-layers", str(src), "--num-layers", "1", "--out", str(tmp_path / "o")]) == 2
    assert "drop-layers takes an encoder or a sequence classifier or a question-answering model" \
        in capsys.readouterr().err
