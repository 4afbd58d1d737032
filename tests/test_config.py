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


def test_model_differences_name_fields():
    a = preset("cpu-demo")
    b = a.with_overrides(["model.embedding_dim=32", "train.learning_rate=0.5"])
    diffs = b.model_differences(a)
    assert diffs == ["model.embedding_dim: saved 64, requested 32"]


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    assert {k.split(".")[0] for k in keys} == {"data", "model", "train"}


def test_unknown_preset():
    with pytest.raises(ConfigError, match="cpu-demo"):
        preset("nope")
