import tomllib
from pathlib import Path

import pytest

from fedpeft.config import CHOICES, DEFAULTS, ConfigError, ExperimentConfig, flatten, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "simulations" / "configs").glob("*.toml"))


def test_unknown_key_is_rejected_with_a_suggestion_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_flat({"train.lrr": 0.1})
    msg = str(err.value)
    assert "'train.lrr'" in msg and "did you mean train.lr" in msg and "peft.lora-rank" in msg


def test_wrong_type_names_the_key_and_the_wanted_type():
    with pytest.raises(ConfigError, match="'peft.lora-rank' wants int, got str"):
        ExperimentConfig.from_flat({"peft.lora-rank": "8"})


def test_unknown_choice_lists_the_valid_choices():
    with pytest.raises(ConfigError, match="valid choices: none, int8, nf4"):
        ExperimentConfig.from_flat({"model.quantization": "fp4"})


@pytest.mark.parametrize(
    "key,value,rule",
    [("peft.lora-rank", 0, "> 0"), ("participation.fraction", 1.5, r"in \(0, 1\]"), ("train.lr", -1.0, "> 0")],
)
def test_out_of_range_values_are_rejected(key, value, rule):
    with pytest.raises(ConfigError, match=rule):
        ExperimentConfig.from_flat({key: value})


def test_flat_round_trip_is_identity():
    cfg = ExperimentConfig.from_flat({"train.lr": 0.01, "peft.method": "ia3", "seed": 3})
    assert ExperimentConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.train.lr == 0.01 and cfg.peft.method == "ia3" and cfg.seed == 3


def test_ints_are_accepted_for_float_keys():
    assert ExperimentConfig.from_flat({"strategy.server-lr": 2}).strategy.server_lr == 2.0


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_override("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_override("strategy.name=fedavg") == ("strategy.name", "fedavg")
    assert parse_override("peft.train-head=false") == ("peft.train-head", False)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_missing_config_file_names_the_examples_folder(tmp_path):
    with pytest.raises(ConfigError, match="simulations/configs"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# fedpeft simulate ") and path.name in first and "min" in first
    assert cfg.name == path.stem


def test_pyproject_app_defaults_equal_the_dataclass_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert app_config == DEFAULTS
    assert ExperimentConfig().to_flat().items() <= DEFAULTS.items()
    assert "federations" not in pyproject["tool"]["flwr"]


def test_strategy_choices_match_the_names_build_strategy_wires():
    from strategies import NAMES

    assert set(CHOICES["strategy.name"]) == set(NAMES)


def test_a_one_entry_list_key_given_as_a_number_is_read_as_its_text():
    cfg = ExperimentConfig.from_flat({"peft.layers": parse_override("peft.layers=5")[1]})
    assert cfg.peft.layers == "5"
    with pytest.raises(ConfigError, match="wants str"):
        ExperimentConfig.from_flat({"peft.layers": 5.5})
