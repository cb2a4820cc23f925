"""Data loading: JSONL/CSV, pairs, label ordering and errors."""

import pytest
from conftest import make_tokenizer

from obert import ObertError
from obert.tasks.data import Encoded, encode_labels, label_list, load_data, load_file


def test_csv_with_pairs_and_integer_labels(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("text,text_pair,label\nalpha beta,gamma,10\ndelta,epsilon zeta,2\neta,theta,10\n")
    rows = load_file(path)
    assert rows.pairs == ["gamma", "epsilon zeta", "theta"]
    labels = label_list(rows.labels)
    assert labels == [2, 10]  # numeric order, not string order
    label2id = {str(v): i for i, v in enumerate(labels)}
    assert encode_labels(rows.labels, label2id) == [1, 0, 1]
    enc = Encoded(rows, make_tokenizer(tmp_path), label2id, max_length=16)
    batch = enc.collate([enc[0], enc[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]
    assert 1 in batch["token_type_ids"][0].tolist()  # the pair is encoded as a second segment


def test_string_labels_sorted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "web"}\n{"text": "b", "label": "admin"}\n')
    assert label_list(load_file(path).labels) == ["admin", "web"]


@pytest.mark.parametrize("content,suffix,message", [
    ('{"text": "a"}\n', ".jsonl", "missing column 'label'"),
    ('{"label": "x"}\n', ".jsonl", "missing column 'text'"),
    ("text,label\n", ".csv", "no rows"),
    ("whatever", ".txt", "unsupported data file type"),
])
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"f{suffix}"
    path.write_text(content)
    with pytest.raises(ObertError, match=message):
        load_file(path)


def test_unknown_task_and_no_source():
    with pytest.raises(ObertError, match="unknown task"):
        load_data(None, "not-a-glue-task", "train")
    with pytest.raises(ObertError):
        load_data(None, None, "train")


def test_glue_task_maps_columns_and_eval_split(monkeypatch):
    """--task goes through datasets.load_dataset('glue', task) with the task's own columns."""
    import datasets

    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        if name == "sst2":
            return datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]})
        return datasets.Dataset.from_dict({"premise": ["a b", "c"], "hypothesis": ["d", "e f"],
                                           "label": [2, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_data(None, "mnli", "eval")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert rows.texts == ["a b", "c"] and rows.pairs == ["d", "e f"] and rows.labels == [2, 0]
    sst2 = load_data(None, "sst2", "train")
    assert calls[-1] == ("glue", "sst2", "train")
    assert sst2.texts == ["good", "bad"] and sst2.pairs is None


def test_loading_leaves_the_callers_logging_as_it_was(tiny_model_dir, data_files):
    """Library calls quiet Transformers and datasets while they load, then restore the caller's
    verbosity and progress bars (they used to switch them off for the whole process)."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from obert.tasks.data import load_file
    from obert.model.loading import load_config, load_tokenizer, load_weights

    hf_logging.set_verbosity_info()
    datasets.logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    try:
        load_config(tiny_model_dir)
        load_tokenizer(tiny_model_dir)
        load_weights(AutoModelForSequenceClassification, tiny_model_dir)
        assert len(load_file(data_files[0]).texts) == 96
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert datasets.logging.get_verbosity() == datasets.logging.INFO
        assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()
        datasets.logging.set_verbosity_warning()
