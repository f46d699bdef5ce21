"""Configs that describe themselves: field metadata (help, range, choices), the one validator,
the generated config reference page, and the registries of kinds and methods."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from megedit.config import MeGConfig, layered
from megedit.errors import ConfigError
from megedit.methods import METHODS, WEIGHT_EDITORS, get_method
from megedit.settings import Range, check_settings, field_problems, help_of
from megedit.stages.generator import GeneratorConfig
from megedit.stages.generator.kinds import GENERATOR_KINDS, generator_kind
from megedit.stages.router import ROUTER_KINDS, RouterConfig, router_kind

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_config_reference_page_is_current():
    script = _script()
    assert script.PAGE.read_text(encoding="utf-8") == script.render(), "run scripts/config_reference.py"


def test_every_config_field_has_help_text():
    for _, _, defaults in _script().SECTIONS:
        missing = [f.name for f in fields(defaults) if not help_of(f)]
        assert not missing, f"{type(defaults).__name__}: no help for {missing}"


def test_ranges_read_and_check_as_written():
    assert (str(Range(0, low_open=True)), str(Range(1)), str(Range(0, 1, high_open=True))) == ("> 0", ">= 1", "in [0, 1)")
    assert 0.5 in Range(0, 1, high_open=True) and 1 not in Range(0, 1, high_open=True) and "1" not in Range(0)


def test_one_validator_checks_every_range_and_choice():
    bad = GeneratorConfig(lr=0, kind="gan", passes=None)
    assert field_problems(bad) == ["kind must be one of dit, mlp, lookup, found 'gan'", "lr must be > 0, found 0"]
    with pytest.raises(ConfigError, match=r"^generator config: kind must be one of .*; lr must be > 0, found 0$"):
        bad.validate()
    with pytest.raises(ConfigError, match=r"^router config: dropout must be in \[0, 1\), found 1.5$"):
        RouterConfig(dropout=1.5).validate()
    assert check_settings(RouterConfig(), "router config") == RouterConfig()


def test_one_default_per_setting():
    assert GeneratorConfig() == MeGConfig().generator
    assert (GeneratorConfig().kind, GeneratorConfig().passes) == ("lookup", 500.0)


def test_train_steps_given_alone_clears_passes_in_every_layer():
    assert MeGConfig.from_dict({"generator": {"train_steps": 7}}).generator.passes is None
    assert MeGConfig.from_dict({"generator": {"train_steps": 7, "passes": 3}}).generator.passes == 3
    over_a_file = layered(MeGConfig().to_dict(), {"generator": {"train_steps": 7}})
    assert (over_a_file["generator"]["train_steps"], over_a_file["generator"]["passes"]) == (7, None)


def test_each_kind_and_method_is_one_registry_entry():
    assert list(GENERATOR_KINDS) == ["dit", "mlp", "lookup"] and list(ROUTER_KINDS) == ["entropy", "nearest"]
    assert list(METHODS) == ["meg", "ft", "memit", "alphaedit"] and WEIGHT_EDITORS == ("ft", "memit", "alphaedit")
    assert [generator_kind(k).trains for k in GENERATOR_KINDS] == [True, True, False]
    assert router_kind("nearest").max_distance(RouterConfig()) == 2.0
    alpha = get_method("alphaedit").settings({"l2": 5.0}, seed=3, layer=9, layers=(1, 2))
    assert (alpha.method, alpha.l2, alpha.seed, alpha.layers) == ("alphaedit", 5.0, 3, (1, 2))
    assert is_dataclass(get_method("meg").config())
    for lookup, known in ((generator_kind, "dit, mlp, lookup"), (router_kind, "entropy, nearest"),
                          (get_method, "meg, ft, memit, alphaedit")):
        with pytest.raises(ConfigError, match=f"must be one of {known}, found 'x'"):
            lookup("x")


def test_no_branch_on_a_kind_or_method_name_outside_the_registries():
    names = "lookup|mlp|dit|entropy|nearest|memit|alphaedit|ft|meg"
    branch = re.compile(rf'(==|!=)\s*"({names})"|"({names})"\s*(==|!=)|\bin \("({names})"')
    found = [f"{path.relative_to(ROOT)}:{i}" for path in sorted((ROOT / "src" / "megedit").rglob("*.py"))
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if branch.search(line)]
    assert not found, found
