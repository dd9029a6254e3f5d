"""The validation split: carved from the unused training pool, never from test; scored every round."""

import numpy as np
import pytest

from fedpeft.config import ConfigError, DataConfig, ExperimentConfig
from fedpeft.data import carve_validation, load_splits
from fedpeft.results import load_results
from simulations.inprocess import run_in_process
from simulations.run import main
from tests.helpers import tiny_config


def test_carve_validation_splits_the_indices_into_two_disjoint_parts_that_cover_them_once():
    indices = np.array([40, 41, 42, 43, 44, 45, 46, 47, 48, 49])
    rest, val = carve_validation(indices, 3, seed=7)
    assert len(val) == 3 and len(rest) == 7
    assert not set(rest) & set(val)
    assert sorted(np.concatenate([rest, val])) == list(indices)
    assert list(rest) == [i for i in indices if i not in set(val)]  # the rest keeps its order


def test_carve_validation_is_a_pure_function_of_its_inputs():
    indices = np.arange(100, 200)
    a, b = carve_validation(indices, 10, seed=3), carve_validation(indices, 10, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    other = carve_validation(indices, 10, seed=4)[1]
    assert not np.array_equal(a[1], other)  # the seed chooses the rows
    assert carve_validation(indices, 0, seed=3)[1].size == 0


@pytest.mark.parametrize("num_val", [-1, 11])
def test_carve_validation_refuses_a_size_outside_the_indices(num_val):
    with pytest.raises(ValueError, match=r"num_val=.* must be between 0 and the 10 indices given"):
        carve_validation(np.arange(10), num_val, seed=0)


def test_train_validation_and_test_are_disjoint_and_training_rows_do_not_move():
    plain = load_splits(DataConfig(num_train_examples=300, num_test_examples=100))
    carved = load_splits(DataConfig(num_train_examples=300, num_test_examples=100, num_val_examples=50))
    assert plain.validation is None
    train, val, test = set(carved.train.texts), set(carved.validation.texts), set(carved.test.texts)
    assert len(carved.validation) == 50 and len(val) == 50
    assert not train & val and not val & test and not train & test
    # carved from the rows training leaves unused: same training rows and test set as without validation
    assert carved.train.texts == plain.train.texts and carved.test.texts == plain.test.texts


def test_with_every_pool_row_in_training_validation_comes_out_of_the_pool():
    full = load_splits(DataConfig(num_train_examples=0, num_test_examples=100))
    carved = load_splits(DataConfig(num_train_examples=0, num_test_examples=100, num_val_examples=40))
    assert len(carved.train) == len(full.train) - 40
    assert set(carved.train.texts) | set(carved.validation.texts) == set(full.train.texts)


def test_a_validation_split_larger_than_the_pool_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"data.num-val-examples=20000 leaves no training rows.*set data.num-val"):
        load_splits(DataConfig(num_test_examples=100, num_val_examples=20_000))
    with pytest.raises(ValueError, match=r"data.num-train-examples=12400 .*validation rows.*set data.num-train"):
        load_splits(DataConfig(num_train_examples=12_400, num_test_examples=100, num_val_examples=500))


def test_a_balanced_training_draw_takes_the_first_rows_of_each_label_in_pool_order():
    plain = load_splits(DataConfig(num_train_examples=0, num_test_examples=100))
    cfg = DataConfig(num_train_examples=301, num_test_examples=100, balanced_train=True)
    balanced = load_splits(cfg)
    assert np.bincount(balanced.train.labels).tolist() == [151, 150]  # the odd row goes to label 0
    pool = list(zip(plain.train.texts, plain.train.labels.tolist(), strict=True))
    firsts = {0: set([t for t, y in pool if y == 0][:151]), 1: set([t for t, y in pool if y == 1][:150])}
    expected = [t for t, y in pool if t in firsts[y]]  # pool order kept
    assert list(balanced.train.texts) == expected
    assert balanced.test.texts == plain.test.texts
    # validation comes from the rows the balanced draw skipped, and the draw does not move with it
    carved = load_splits(
        DataConfig(num_train_examples=301, num_test_examples=100, num_val_examples=60, balanced_train=True)
    )
    assert carved.train.texts == balanced.train.texts and not set(carved.validation.texts) & set(carved.train.texts)
    with pytest.raises(ConfigError, match=r"data.balanced-train needs 6000 rows of each label.*num-train-examples <="):
        load_splits(DataConfig(num_train_examples=12_000, num_test_examples=100, balanced_train=True))
    with pytest.raises(ConfigError, match=r"data.num-train-examples.*> 0 with data.balanced-train"):
        ExperimentConfig.from_flat({"data.balanced-train": True, "data.num-train-examples": 0})


def test_a_negative_validation_size_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="data.num-val-examples"):
        ExperimentConfig.from_flat({"data.num-val-examples": -5})


@pytest.mark.slow
def test_every_round_scores_validation_and_only_the_last_round_scores_test(tmp_path):
    cfg = tiny_config(**{"data.num-val-examples": 48, "num-rounds": 1})
    results = load_results(run_in_process(cfg, tmp_path / "run"))
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["val_loss"] > 0 for r in rounds)
    assert all("val_balanced_accuracy" in r for r in rounds)
    assert [r["accuracy"] is None for r in rounds] == [True, False]
    # 48 validation rows: accuracies are multiples of 1/48
    assert all(abs(r["val_accuracy"] * 48 - round(r["val_accuracy"] * 48)) < 1e-9 for r in rounds)
    assert results["splits"]["val_accuracy"].startswith("validation (48 rows")
    assert results["splits"]["accuracy"] == "test (64 held-out rows); last round only"


def test_fedpeft_check_refuses_a_validation_split_larger_than_the_pool_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\n[data]\nnum-test-examples = 100\nnum-val-examples = 20000\n')
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.num-val-examples=20000 leaves no training rows" in err and "12652 rows after the 100 test" in err
