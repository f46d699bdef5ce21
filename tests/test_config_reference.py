"""Configs that describe themselves: field metadata (help, range, choices), the one validator,
the generated config reference page, and the registries of kinds and methods."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import asdict, fields, is_dataclass
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


def test_train_steps_given_alone_clears_passes_in_python_too():
    assert GeneratorConfig(train_steps=123).steps_for(2048) == 123 and GeneratorConfig(train_steps=123).passes is None
    default = GeneratorConfig()
    assert (default.train_steps, default.passes, default.steps_for(2048)) == (4000, 500.0, 8000)  # 500 x 2048 / 128
    assert GeneratorConfig(train_steps=123, passes=3.0).steps_for(2048) == 48  # both given: passes, as before
    saved = asdict(default)  # what a pack stores: both budgets, so it loads to the same steps
    assert (saved["train_steps"], saved["passes"]) == (4000, 500.0) and GeneratorConfig(**saved) == default
    assert GeneratorConfig(**{**saved, "passes": None}).steps_for(2048) == 4000


def test_each_kind_and_method_is_one_registry_entry():
    assert list(GENERATOR_KINDS) == ["dit", "mlp", "lookup"] and list(ROUTER_KINDS) == ["entropy", "nearest"]
    assert list(METHODS) == ["meg", "ft", "memit", "alphaedit"] and WEIGHT_EDITORS == ("ft", "memit", "alphaedit")
    assert [generator_kind(k).trains for k in GENERATOR_KINDS] == [True, True, False]
    assert router_kind("nearest").max_distance(RouterConfig()) == 2.0
    assert [router_kind(k).trains for k in ROUTER_KINDS] == [True, False]
    assert [m.resumes for m in METHODS.values()] == [False, True, False, False]
    alpha = get_method("alphaedit").settings({"l2": 5.0}, seed=3, layer=9, layers=(1, 2))
    assert (alpha.method, alpha.l2, alpha.seed, alpha.layers) == ("alphaedit", 5.0, 3, (1, 2))
    assert is_dataclass(get_method("meg").config())
    for lookup, known in ((generator_kind, "dit, mlp, lookup"), (router_kind, "entropy, nearest"),
                          (get_method, "meg, ft, memit, alphaedit")):
        with pytest.raises(ConfigError, match=f"must be one of {known}, found 'x'"):
            lookup("x")


NAMES = "lookup|mlp|dit|entropy|nearest|memit|alphaedit|ft|meg"  # every generator, router and method name
Q = "[\"']"
# a comparison with a name, or a test of membership (not a for loop) in a literal list of names
BRANCH = re.compile(rf"(==|!=)\s*{Q}({NAMES}){Q}|{Q}({NAMES}){Q}\s*(==|!=)"
                    rf"|(?<!for )\b[\w.\[\]\"']+ in [(\[{{]\s*{Q}({NAMES}){Q}")
# a dict keyed by names beside the registries, a branch in disguise (checked in bench/)
KEYED = re.compile(rf"{{\s*{Q}({NAMES}){Q}\s*:")
# bench/ lines that match but name no kind or method: (file, text on the line, why)
NOT_A_KIND = [("causal_trace.py", 'keep = {"mlp": {}, "hidden": {}}', "the model's MLP blocks, not a generator kind")]


def _matches(paths, pattern) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for path in paths
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]


def test_no_branch_on_a_kind_or_method_name_outside_the_registries():
    assert not _matches(sorted((ROOT / "src" / "megedit").rglob("*.py")), BRANCH)


def test_no_branch_on_a_kind_or_method_name_in_bench():
    either = re.compile(f"{BRANCH.pattern}|{KEYED.pattern}")
    found = [hit for hit in _matches(sorted((ROOT / "bench").glob("*.py")), either)
             if not any(hit.startswith(f"bench/{file}:") and hit.endswith(text) for file, text, _ in NOT_A_KIND)]
    assert not found, found


def test_the_name_patterns_catch_branches_and_pass_data():
    for branch in ('if kind == "dit":', "if 'ft' != method:", 'elif m in ("ft", "memit"):', 'RUNS = {"ft": ft_config}',
                   'if r["method"] in ["memit"]:'):
        assert BRANCH.search(branch) or KEYED.search(branch), branch
    for data in ('RouterConfig(kind="nearest")', 'write({"router": "nearest"})', 'r.get("generator", "mlp")',
                 'runs = [s for s in ("ft", "memit:2000")]'):
        assert not (BRANCH.search(data) or KEYED.search(data)), data
