import json

import pytest

from cmc_kit.config import Config, ConfigError, PRESETS, preset, valid_keys


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = preset(name)
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_dotted_overrides_are_typed():
    config = preset("cpu-demo").with_overrides(
        ["model.width=0.5", "data.augment=true", "model.views=terrain,height", "train.epochs=3"])
    assert config.model.width == 0.5
    assert config.data.augment is True
    assert config.model.views == ("terrain", "height")
    assert config.train.epochs == 3


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError, match="model.foo") as err:
        preset("cpu-demo").with_overrides({"model.foo": 1})
    assert "model.embedding_dim" in str(err.value)


def test_bad_value_names_setting():
    with pytest.raises(ConfigError, match="train.temperature"):
        preset("cpu-demo").with_overrides(["train.temperature=0"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        preset("cpu-demo").with_overrides(["data.batch_size=many"])


def test_resume_differences_name_the_fixed_fields_only():
    a = preset("cpu-demo")
    b = a.with_overrides(["model.embedding_dim=32", "train.learning_rate=0.5"])
    diffs = b.resume_differences(a)
    assert diffs == ["model.embedding_dim: saved 64, requested 32"]
    # The split is fixed when the run is created: its fraction and seed cannot change either.
    c = a.with_overrides(["data.validation_fraction=0.4", "data.split_seed=3", "train.epochs=30"])
    assert c.resume_differences(a) == ["data.validation_fraction: saved 0.25, requested 0.4",
                                       "data.split_seed: saved 0, requested 3"]


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    assert {k.split(".")[0] for k in keys} == {"data", "model", "train"}


def test_unknown_preset():
    with pytest.raises(ConfigError, match="cpu-demo"):
        preset("nope")


def test_saved_config_with_wrong_types_names_the_file_and_key(tmp_path):
    path = tmp_path / "config.json"
    raw = preset("cpu-demo").to_dict()
    raw["data"]["crop_size"] = "64"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: Setting 'data.crop_size' must be an integer"):
        Config.load(path)
    raw["data"]["crop_size"] = 64
    raw["train"]["learning_rate"] = 1  # an int where a float is expected is fine
    path.write_text(json.dumps(raw))
    assert Config.load(path).train.learning_rate == 1.0


@pytest.mark.parametrize("key,value", [("train.keep_checkpoints", 0), ("train.max_nonfinite_steps", 0),
                                       ("train.learning_rate", 0), ("train.eval_subset", -1),
                                       ("train.clipnorm", 0)])
def test_out_of_range_settings_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        preset("cpu-demo").with_overrides({key: value})


def test_parse_duration():
    from cmc_kit.config import parse_duration

    assert parse_duration("11.5h") == 11.5 * 3600
    assert parse_duration("90m") == 5400 and parse_duration("600s") == 600
    assert parse_duration("42") == 42 and parse_duration(7) == 7 and parse_duration(None) is None
    for bad in ("soon", "-1h", "0", ""):
        with pytest.raises(ConfigError, match="--time-limit"):
            parse_duration(bad)


@pytest.mark.parametrize("value,allowed", [(None, True), ("1", True), ("yes", True),
                                           ("0", False), (" Off ", False), ("false", False),
                                           ("no", False)])
def test_xla_padding_setting_reads_cmc_kit_xla_pad(monkeypatch, value, allowed):
    from cmc_kit.config import xla_padding_setting

    if value is None:
        monkeypatch.delenv("CMC_KIT_XLA_PAD", raising=False)
    else:
        monkeypatch.setenv("CMC_KIT_XLA_PAD", value)
    assert xla_padding_setting() is allowed
