"""Data loading: the embedded corpus, local files, and the errors that name the fix."""

import pytest

from fedpeft.config import DataConfig, parse_override
from fedpeft.data import load_embedded, load_splits


def test_the_embedded_corpus_has_the_12752_unique_fresh_and_rotten_snippets():
    texts, labels = load_embedded()
    assert len(texts) == len(set(texts)) == 12_752
    assert labels.count("fresh") == 7_368 and labels.count("rotten") == 5_384


def test_the_held_out_split_is_fixed_and_disjoint_from_the_training_pool():
    a = load_splits(DataConfig(num_train_examples=300, num_test_examples=100))
    b = load_splits(DataConfig(num_train_examples=200, num_test_examples=100))
    assert a.test.texts == b.test.texts  # the test set does not depend on the pool size
    assert not set(a.test.texts) & set(a.train.texts)
    assert len(a.train) == 300 and a.train.label_names == ("fresh", "rotten")


def _csv(tmp_path):
    rows = ["review,stars"] + [f"great film number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_local_csv_with_its_own_column_names_loads(tmp_path):
    cfg = DataConfig(dataset=str(_csv(tmp_path)), text_column="review", label_column="stars", num_test_examples=8)
    splits = load_splits(cfg)
    assert splits.train.label_names == ("neg", "pos")
    assert len(splits.train) + len(splits.test) == 40 and len(splits.test) == 8


def test_an_unknown_column_names_the_key_and_the_columns(tmp_path):
    cfg = DataConfig(dataset=str(_csv(tmp_path)), text_column="text", label_column="stars")
    with pytest.raises(KeyError, match=r"data.text-column='text' is not a column .*\['review', 'stars'\]"):
        load_splits(cfg)


def test_a_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(DataConfig(dataset=str(tmp_path / "nope.csv")))


def test_paths_and_hub_ids_pass_through_the_command_line_as_strings():
    assert parse_override("data.dataset=/data/reviews.csv") == ("data.dataset", "/data/reviews.csv")
    assert parse_override("model.name=distilbert-base-uncased") == ("model.name", "distilbert-base-uncased")
