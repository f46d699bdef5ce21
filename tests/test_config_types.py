"""Config files: every setting has its declared type; a wrong one is a one-line error naming it."""

import pytest

from megedit import MeGConfig
from megedit.errors import ConfigError


@pytest.mark.parametrize("settings, message", [
    ({"generator": {"train_steps": 2.5}}, "config.generator.train_steps: expected an integer, found float 2.5"),
    ({"fit": {"lr": "abc"}}, "config.fit.lr: expected a number, found str 'abc'"),
    ({"seed": [1, 2]}, "config.seed: expected an integer, found list [1, 2]"),
    ({"layer": True}, "config.layer: expected an integer or null, found bool True"),
    ({"routing": {"calibration_size": "x"}}, "config.routing.calibration_size: expected an integer, found str 'x'"),
    ({"routing": {"router": {"epsilon": "0.3"}}}, "config.routing.router.epsilon: expected a number or null"),
    ({"generator": {"augment": "yes"}}, "config.generator.augment: expected true or false"),
])
def test_a_wrongly_typed_setting_is_one_line_naming_it(settings, message):
    with pytest.raises(ConfigError) as error:
        MeGConfig.from_dict(settings)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_well_typed_settings_load_and_a_step_budget_replaces_the_default_passes():
    config = MeGConfig.from_dict({"fit": {"lr": 1, "paraphrases": 2}, "routing": {"router": {"epsilon": None}},
                                  "generator": {"train_steps": 50}})
    assert config.fit.lr == 1 and config.fit.paraphrases == 2 and config.routing.router.epsilon is None
    assert config.generator.train_steps == 50 and config.generator.passes is None
    assert MeGConfig.from_dict({"generator": {"kind": "dit"}}).generator.passes == 500
