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


def test_every_key_has_help_and_every_pyproject_key_is_listed_by_fedpeft_config(capsys):
    from fedpeft.config import KEYS
    from simulations.run import main

    assert [k for k, key in KEYS.items() if len(key.help) < 10] == []
    assert main(["config"]) == 0
    listed = {line.split(" = ")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(flatten(pyproject["tool"]["flwr"]["app"]["config"])) == listed == set(KEYS)


def test_fedpeft_config_shows_one_key_or_section_and_refuses_an_unknown_key_naming_close_matches(capsys):
    from simulations.run import main

    assert main(["config", "dp.max-weight"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dp.max-weight = 0.0\n") and "range: >= 0 (0 = no cap)" in out
    assert "only with dp.mode = client" in out and "FedAU's omega" in out
    assert main(["config", "participation"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help is wrapped at 100 columns
    assert 'participation.model = "uniform"' in out and "only with participation.model = markov" in out
    assert main(["config", "dp.clipnorm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: unknown config key 'dp.clipnorm'; did you mean dp.clip-norm?")


def test_string_choices_are_the_literals_of_their_fields_and_every_default_is_in_range():
    from fedpeft.choices import rule_holds
    from fedpeft.config import KEYS

    assert {k: key.choices for k, key in KEYS.items() if key.choices} == CHOICES
    assert [k for k, key in KEYS.items() if key.rule and not rule_holds(key.rule, key.default)] == []
    assert [rule_holds("in (0, 1]", v) for v in (0.0, 0.5, 1.0)] == [False, True, True]
    assert [rule_holds("in [0, 0.5)", v) for v in (0.0, 0.5)] == [True, False]
    assert [rule_holds(">= 0 (0 = all)", v) for v in (-1, 0)] == [False, True]


def test_variants_that_share_a_key_agree_on_its_default_and_help():
    import dataclasses

    from fedpeft.config import VARIANT_SECTIONS

    for variants in VARIANT_SECTIONS.values():
        seen = {}
        for cls in variants.classes.values():
            for f in dataclasses.fields(cls):
                if f.name != variants.switch:
                    assert seen.setdefault(f.name, (f.default, f.metadata["help"])) == (f.default, f.metadata["help"])


def test_a_switched_off_mode_has_no_fields_and_its_settings_are_refused_unless_set_switched_it_off(tmp_path):
    from fedpeft.check import check_settings, config_sources

    assert not hasattr(ExperimentConfig().dp, "clip_norm") and "dp.clip-norm" not in ExperimentConfig().to_flat()
    client = ExperimentConfig.from_flat({"dp.mode": "client", "dp.clip-norm": 2.0, "strategy.weighting": "uniform"})
    assert (client.dp.clip_norm, client.dp.max_weight) == (2.0, 0.0) and not hasattr(client.dp, "grad_sample_mode")
    off = tmp_path / "off.toml"
    off.write_text('name = "off"\n[dp]\nclip-norm = 2.0\n')
    with pytest.raises(ConfigError, match=r"dp.clip-norm=2.0 has no effect because dp.mode='none' .*remove dp.clip"):
        check_settings(load_config(off), config_sources(off, {}))
    path = tmp_path / "dp.toml"
    path.write_text('name = "dp"\n[dp]\nmode = "sample"\nclip-norm = 2.0\n')
    both = {"dp.mode": "none", "dp.clip-norm": 3.0}  # --set gives the dead setting itself: an error
    with pytest.raises(ConfigError, match=r"dp.clip-norm=3.0 has no effect"):
        check_settings(load_config(path, both), config_sources(path, both))
    overrides = {"dp.mode": "none"}  # the README's runs: the switch off on a file that carries the setting
    warnings = check_settings(load_config(path, overrides), config_sources(path, overrides))
    assert warnings == [
        "dp.clip-norm=2.0 has no effect because dp.mode='none' (it is read with dp.mode = sample / client only); "
        "remove dp.clip-norm or change dp.mode"
    ]


def test_a_key_given_twice_in_any_form_is_refused(tmp_path, capsys):
    from simulations.run import main

    dotted = tmp_path / "dotted.toml"
    dotted.write_text('name = "x"\ntrain.lr = 0.1\n[train]\nlr = 0.2\n')
    with pytest.raises(ConfigError, match="not readable UTF-8 TOML .*fix that line"):
        load_config(dotted)
    quoted = tmp_path / "quoted.toml"
    quoted.write_text('name = "x"\n"peft.lora-rank" = 4\n[peft]\nlora-rank = 4\n')
    with pytest.raises(ConfigError, match=r"'peft.lora-rank' is given twice .*keep one"):
        load_config(quoted)
    assert main(["check", str(CONFIGS[0]), "--set", "train.lr=0.1", "--set", "train.lr=0.2"]) == 2
    assert "--set train.lr is given twice (0.1 and 0.2); keep one" in capsys.readouterr().err
