"""The command line as users meet it: --version, global flags on either side of the verb, --device
and --dtype, defaults in the help, config flags derived from the config dataclasses, `megedit
config`, and the example configs shipped (issue 22, item 1)."""

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, fields, is_dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from megedit.cli import build_parser
from megedit.cli.options import DEST, RESOLVED, Section, add_dataclass_flags, meg_config, overrides
from megedit.config import MeGConfig
from megedit.settings import setting

MEGEDIT = [sys.executable, "-m", "megedit.cli"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"
MODEL_VERBS = ("demo", "fit", "add", "remove", "generate", "eval", "serve", "inspect", "fit-neurons", "sweep-layers")


def _run(*args, timeout=120):
    return subprocess.run([*MEGEDIT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _error_line(*args) -> str:
    out = _run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def _verb(name: str) -> argparse.ArgumentParser:
    """A verb's parser with its deferred option groups built (as parsing or --help builds them)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[name]
    parser.format_help()
    return parser


def _options(name: str) -> set[str]:
    return {s for a in _verb(name)._actions for s in a.option_strings}


# -- the surface --------------------------------------------------------------------------------


def test_version_is_the_installed_one():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout == f"megedit {version('megedit')}\n"


def test_the_entry_point_and_python_m_agree():
    script = Path(sys.executable).with_name("megedit")
    if not script.exists():
        pytest.skip("the megedit console script is not installed next to this Python")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == _run("--version").stdout


def test_verbs_are_listed_in_the_order_users_meet_them():
    out = _run("--help")
    assert out.returncode == 0
    order = ["demo", "fit", "add", "remove", "generate", "eval", "serve", "inspect", "config", "fit-neurons",
             "sweep-layers", "fit-router"]
    section = out.stdout.split("positional arguments:")[1].split("options:")[0]
    listed = re.findall(r"^    (\S+)", section, re.MULTILINE)  # a verb's row; its help's wrapped lines are deeper
    assert listed == order


def test_usage_errors_and_top_help_do_not_import_torch():
    code = ("import sys; from megedit.cli import build_parser; p = build_parser(); "
            "p.parse_args(['generate', 'pack', 'q']); p.parse_args(['eval', '--data', 'jsonl:x']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv, quiet, debug", [
    (["--quiet", "config"], True, False),
    (["config", "--quiet"], True, False),
    (["--debug", "config", "--quiet"], True, True),
    (["config", "--debug"], False, True),
    (["config"], False, False),
])
def test_global_flags_go_before_or_after_the_verb(argv, quiet, debug):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.debug) == (quiet, debug)


def test_debug_after_the_verb_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator:\n  train_steps: 2.5\n")
    line = _error_line("config", "--config", bad)
    assert line == f"megedit: error: {bad}.generator.train_steps: expected an integer, found float 2.5"
    out = _run("config", "--config", bad, "--debug")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr
    assert _run("config", "--quiet").stdout == _run("--quiet", "config").stdout != ""


@pytest.mark.parametrize("verb", MODEL_VERBS)
def test_every_verb_that_loads_a_model_takes_model_device_and_dtype(verb):
    assert {"--model", "--device", "--dtype"} <= _options(verb)


def test_help_shows_defaults():
    out = _run("fit", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for expected in ("--device DEVICE cpu, cuda, cuda:N, mps or auto", "(default: auto)", "(default: float32)",
                     "--fit-margin MARGIN, --margin MARGIN", "must be >= 0 (default: 3.0)", "--generator-steps TRAIN_STEPS",
                     "(default: 500.0)", "--no-generator-augment", "(default: lookup)"):
        assert expected in text, expected


# -- --device and --dtype -----------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["eval", "generate", "fit", "fit-neurons"])
@pytest.mark.parametrize("flag, value, expected", [
    ("--device", "tpu", "expected one of auto, cpu, cuda, cuda:N, mps, found 'tpu'"),
    ("--device", "cuda:x", "expected one of auto, cpu, cuda, cuda:N, mps, found 'cuda:x'"),
    ("--dtype", "int8", "expected one of float32, bfloat16, float16, auto, found 'int8'"),
])
def test_a_bad_device_or_dtype_is_a_one_line_usage_error(verb, flag, value, expected):
    args = {"eval": ["--data", "jsonl:x"], "generate": ["pack", "q"], "fit": ["--data", "jsonl:x", "--out", "o"],
            "fit-neurons": ["--data", "jsonl:x", "--out", "o"]}[verb]
    assert _error_line(verb, *args, flag, value) == f"megedit {verb}: error: argument {flag}: {expected}"


def test_a_device_the_machine_lacks_is_one_line_before_the_model_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    line = _error_line("eval", "--data", f"jsonl:{data}", "--device", "cuda:1")
    assert line.startswith("megedit: error: --device cuda:1: ") and "CUDA" in line


def _tiny_model_dir(tmp_path) -> Path:
    from tiny import char_tokenizer, tiny_model

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_dtype_and_device_reach_load_model(tmp_path):
    import torch

    from megedit.cli.common import load_lm

    folder = _tiny_model_dir(tmp_path)
    for name, expected in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
                           ("auto", torch.float32)):  # auto: the checkpoint's own (saved as float32)
        model, _ = load_lm(argparse.Namespace(model=str(folder), device="cpu", dtype=name))
        assert (model.dtype, model.device.type) == (expected, "cpu")


def test_half_precision_on_the_cpu_works_with_a_one_line_warning(tmp_path):
    folder = _tiny_model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "target": "cd", "rephrases": ["ab!"], "locality": ["xy"]}) + "\n")
    common = ["eval", "--model", folder, "--data", f"jsonl:{data}", "--device", "cpu", "--max-new-tokens", "6"]
    out = _run(*common, "--dtype", "bf16", "--quiet", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    ours = [line for line in out.stderr.splitlines() if line.startswith("megedit:")]
    assert ours == ["megedit: warning: bfloat16 on the CPU is slow; float32 is usually faster there"]
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 1
    out = _run(*common, "--quiet")  # float32: no warning
    assert out.returncode == 0 and "megedit:" not in out.stderr


def test_ft_with_json_checkpoints_its_training_and_clears_the_file_once_written(tmp_path):
    folder = _tiny_model_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "ab", "target": "cd", "rephrases": ["ab!"], "locality": ["xy"]}) + "\n")
    out = _run("eval", "--model", folder, "--data", f"jsonl:{data}", "--device", "cpu", "--max-new-tokens", "4",
               "--method", "ft", "--layer", "1", "--epochs", "2", "--quiet", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["method"] == "ft" and len(report["edit"]["epoch_losses"]) == 2
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith("e.json")) == ["e.json"]


# -- flags derived from the config dataclasses --------------------------------------------------


@dataclass
class _Toy:
    steps: int = setting(3, at_least=1, help="how many")
    rate: float = 0.5
    name: str = setting("a", choices=("a", "b"), help="which")
    on: bool = True
    limit: float | None = setting(None, help="None: no limit")
    table: dict | None = None


def test_dataclass_flags_are_typed_and_give_back_only_what_was_given():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, _Toy(), Section(("toy",), "toy", "toy"), aliases={"steps": ("--n",)})
    names = {s for a in parser._actions for s in a.option_strings}
    assert {"--toy-steps", "--n", "--toy-rate", "--toy-name", "--toy-on", "--no-toy-on", "--toy-limit"} <= names
    assert "--toy-table" not in names  # dicts are for config files
    assert overrides(parser.parse_args([])) == {}
    args = parser.parse_args(["--n", "4", "--toy-rate", "2", "--no-toy-on", "--toy-limit", "none"])
    assert overrides(args) == {"toy": {"steps": 4, "rate": 2.0, "on": False, "limit": None}}
    assert overrides(parser.parse_args(["--toy-limit", "1.5"])) == {"toy": {"limit": 1.5}}
    help_text = " ".join(parser.format_help().split())
    assert "how many; must be >= 1 (default: 3)" in help_text and "None: no limit (default: none)" in help_text


def test_dataclass_flags_check_choices_and_counts_at_parse_time(capsys):
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, _Toy(), Section((), "", "toy"))  # choices and counts from the fields' metadata
    assert overrides(parser.parse_args(["--name", "b", "--steps", "1"])) == {"name": "b", "steps": 1}
    for bad in (["--name", "c"], ["--steps", "0"], ["--rate", "fast"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    err = capsys.readouterr().err
    assert "invalid choice: 'c'" in err and "expected a positive integer, found '0'" in err
    assert "expected a number, found 'fast'" in err


def _scalar_paths(value, path=()):
    """Dotted paths of every scalar setting of a config dataclass, nested ones included."""
    for f in fields(value):
        child = getattr(value, f.name)
        if is_dataclass(child):
            yield from _scalar_paths(child, (*path, f.name))
        elif not isinstance(child, dict) and f.name not in RESOLVED.get(".".join(path), ()):
            yield ".".join((*path, f.name))


@pytest.mark.parametrize("verb", ["fit", "demo", "config"])
def test_every_meg_setting_has_a_flag(verb):
    dests = {a.dest for a in _verb(verb)._actions}
    missing = [p for p in _scalar_paths(MeGConfig()) if DEST + p not in dests]
    assert missing == []


def test_the_flag_names_users_know_still_work():
    args = build_parser().parse_args([
        "fit", "--data", "jsonl:x", "--out", "o", "--margin", "2", "--paraphrases", "1", "--prefixes", "2",
        "--variant", "gated", "--max-steps", "50", "--optimizer", "sgd", "--generator-steps", "300",
        "--generator", "dit", "--router", "entropy", "--epsilon", "0.4", "--layer", "5", "--seed", "7",
        "--temperature", "0.1", "--encoder-epochs", "2", "--router-epochs", "9", "--max-false-fire", "3"])
    c = meg_config(args).resolved()
    assert (c.fit.margin, c.fit.paraphrases, c.fit.prefixes, c.fit.variant, c.fit.max_steps) == (2.0, 1, 2, "gated", 50)
    assert (c.generator.kind, c.generator.train_steps, c.generator.passes) == ("dit", 300, None)
    assert (c.routing.router.kind, c.routing.router.epsilon, c.routing.router.max_epochs) == ("entropy", 0.4, 9)
    assert (c.routing.encoder.temperature, c.routing.encoder.epochs, c.routing.router.max_false_fire) == (0.1, 2, 3.0)
    assert (c.layer, c.fit.layer, c.seed, c.fit.init_seed, c.generator.seed) == (5, 5, 7, 7, 7)
    stage = build_parser().parse_args(["fit-neurons", "--data", "jsonl:x", "--out", "o", "--lr", "0.1",
                                       "--batch-size", "8", "--seed", "3", "--margin", "1"])
    assert overrides(stage) == {"fit": {"lr": 0.1, "batch_size": 8, "init_seed": 3, "margin": 1.0}}


def test_flags_override_the_file_and_the_demo_budget_yields_to_both(tmp_path):
    from megedit.cli.meg import DEMO_DEFAULTS

    config = tmp_path / "c.yaml"
    config.write_text("fit: {margin: 1.5, lr: 0.2}\ngenerator: {passes: 300}\n")
    parse = build_parser().parse_args
    c = meg_config(parse(["demo", "--config", str(config), "--margin", "2"]), DEMO_DEFAULTS)
    assert (c.fit.margin, c.fit.lr, c.generator.passes, c.generator.train_steps) == (2.0, 0.2, 300.0, 4000)
    c = meg_config(parse(["demo"]), DEMO_DEFAULTS)  # no file: the demo's 1,000 steps
    assert (c.generator.passes, c.generator.train_steps) == (None, 1000)
    c = meg_config(parse(["demo", "--generator-steps", "50"]), DEMO_DEFAULTS)
    assert (c.generator.passes, c.generator.train_steps) == (None, 50)


# -- megedit config and the example configs -----------------------------------------------------


def test_config_prints_the_defaults_as_yaml_that_loads_back(tmp_path):
    out = _run("config")
    assert out.returncode == 0 and out.stderr == ""
    printed = yaml.safe_load(out.stdout)
    assert printed == MeGConfig().resolved().to_dict()
    (tmp_path / "c.yaml").write_text(out.stdout)
    assert MeGConfig.from_file(tmp_path / "c.yaml").to_dict() == printed


def test_config_with_a_file_and_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"seed": 3, "fit": {"margin": 1.5}, "generator": {"kind": "dit"}}))
    out = _run("config", "--config", config, "--margin", "2", "--router-kind", "entropy", "--no-generator-augment",
               "--format", "qa")
    assert out.returncode == 0, out.stderr
    c = yaml.safe_load(out.stdout)
    assert (c["seed"], c["fit"]["margin"], c["fit"]["init_seed"], c["generator"]["kind"]) == (3, 2.0, 3, "dit")
    assert (c["routing"]["router"]["kind"], c["generator"]["augment"], c["prompt_format"]) == ("entropy", False, "qa")


@pytest.mark.parametrize("args, message", [
    (["--router-epsilon", "5"], "megedit: error: router config: epsilon must be in (0, 2.000] for the nearest router, "
                                "got 5.0"),
    (["--fit-lr", "abc"], "megedit config: error: argument --fit-lr: expected a number, found 'abc'"),
    (["--generator-steps", "0"], "megedit config: error: argument --generator-train-steps/--generator-steps: "
                                 "expected a positive integer, found '0'"),
    (["--router", "far"], "megedit config: error: argument --router-kind/--router: invalid choice: 'far' "
                          "(choose from 'entropy', 'nearest')"),
    (["--fit-lr", "-1"], "megedit: error: fit config: lr must be > 0, found -1.0"),
])
def test_config_refuses_invalid_values_in_one_line(args, message):
    assert _error_line("config", *args).startswith(message)


def test_config_refuses_a_bad_file_in_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("fit: {lr: abc}\n")
    assert _error_line("config", "--config", config) == (
        f"megedit: error: {config}.fit.lr: expected a number, found str 'abc'")


def test_shipped_examples_are_valid_and_default_yaml_is_the_defaults():
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert {p.name for p in examples} >= {"default.yaml", "paper-dit.yaml"}
    for path in examples:
        MeGConfig.from_file(path).resolved()  # every value valid
    assert MeGConfig.from_file(EXAMPLES / "default.yaml").to_dict() == MeGConfig().to_dict()
    assert yaml.safe_load((EXAMPLES / "default.yaml").read_text()) == yaml.safe_load(_run("config").stdout)
    paper = MeGConfig.from_file(EXAMPLES / "paper-dit.yaml")
    assert (paper.generator.kind, paper.generator.passes, paper.routing.router.kind) == ("dit", None, "entropy")


# -- megedit eval: the baselines' settings ------------------------------------------------------


def test_eval_flags_set_the_baselines_settings():
    from megedit.cli.eval import _baseline_config

    parse = build_parser().parse_args
    ft = _baseline_config(parse(["eval", "--data", "jsonl:x", "--method", "ft", "--lr", "0.5", "--ft-optimizer", "adam",
                                 "--ft-norm-constraint", "0.002", "--ft-stop-loss", "0.01", "--seed", "4"]))
    assert (ft.lr, ft.optimizer, ft.norm_constraint, ft.stop_loss, ft.seed, ft.epochs) == (0.5, "adam", 0.002, 0.01, 4, 8)
    alpha = _baseline_config(parse(["eval", "--data", "jsonl:x", "--method", "alphaedit", "--memit-l2", "5",
                                    "--memit-context-prefixes", "0", "--layers", "1,2"]))
    assert (alpha.method, alpha.l2, alpha.context_prefixes, alpha.layers, alpha.mom2_weight) == (
        "alphaedit", 5.0, 0, (1, 2), 15000.0)
    assert _baseline_config(parse(["eval", "--data", "jsonl:x"])) is None


@pytest.mark.parametrize("args, message", [
    (["--method", "memit", "--ft-lr", "1"], "megedit: error: eval: --ft-lr set a method that is not run (--method memit)"),
    (["--memit-kl-factor", "0"], "megedit: error: eval: --memit-kl-factor set a method that is not run (--method none)"),
    (["--method", "memit", "--memit-mom2-weight", "-1"], "megedit: error: memit config: mom2_weight must be >= 0, found -1.0"),
    (["--method", "ft", "--ft-norm-constraint", "0"], "megedit: error: ft config: norm_constraint must be > 0 or null, found 0.0"),
    (["--method", "ft", "--ft-optimizer", "rmsprop"], "megedit eval: error: argument --ft-optimizer"),
    (["--method", "memit", "--pseudo", "jsonl:x", "--cov-tokens", "9"], "megedit: error: --pseudo and --cov-tokens"),
])
def test_eval_refuses_bad_baseline_settings_in_one_line_before_loading(tmp_path, args, message):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    assert _error_line("eval", "--data", f"jsonl:{data}", "--model", tmp_path / "absent", *args).startswith(message)
