"""Hostile but ordinary input (bad bytes, odd templates, deep nesting, nonsense numbers, hand-edited
packs, pickle checkpoints) stops with one line naming what is wrong, never a traceback."""

import json
import subprocess
import sys

import pytest
import torch
from test_editor import fitted  # noqa: F401  (the module-scoped fitted pack)
from tiny import char_tokenizer, tiny_encoder, tiny_model

from megedit import EditedModel
from megedit.edited import manifest_sha256, read_manifest
from megedit.errors import MeGError

MEGEDIT = [sys.executable, "-m", "megedit.cli"]
DEEP = "[" * 100_000 + "]" * 100_000


def _error_line(*args) -> str:
    """The one line a refused command writes to stderr."""
    out = subprocess.run([*MEGEDIT, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def _jsonl(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    return path


# -- data files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["counterfact", "zsre", "jsonl", "rome"])
def test_a_data_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, kind):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('[{"prompt": "café"}]\n'.encode("latin-1"))
    assert _error_line("eval", "--data", f"{kind}:{bad}") == (
        "megedit: error: latin1.json: not UTF-8 text (byte 0xe9 at offset 16)")


def test_a_pool_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "pool.json"
    bad.write_bytes(b"[\xff]")
    line = _error_line("fit", "--data", f"jsonl:{_jsonl(tmp_path)}", "--pseudo", f"zsre:{bad}",
                       "--out", tmp_path / "pack")
    assert line == "megedit: error: pool.json: not UTF-8 text (byte 0xff at offset 1)"


@pytest.mark.parametrize("kind", ["rome", "counterfact"])
@pytest.mark.parametrize("template", ["{} plays for {}", "{name} plays for", "{} plays {", "{!r} plays"])
def test_a_rome_prompt_needs_exactly_one_plain_subject_slot(tmp_path, kind, template):
    data = tmp_path / "rome.json"
    records = [{"requested_rewrite": {"prompt": prompt, "subject": "A", "target_new": {"str": "x"}}}
               for prompt in ("{} is", template)]
    data.write_text(json.dumps(records))
    line = _error_line("eval", "--data", f"{kind}:{data}")
    assert line.startswith("megedit: error: rome.json: record 1: field 'requested_rewrite.prompt': expected a '{}' "
                           "where the subject goes and no other '{...}' field")
    assert repr(template) in line


@pytest.mark.parametrize("kind", ["counterfact", "jsonl"])
def test_deeply_nested_data_is_one_line_naming_the_file(tmp_path, kind):
    data = tmp_path / "deep.json"
    data.write_text(DEEP + "\n")
    where = "deep.json: line 1" if kind == "jsonl" else "deep.json"
    line = _error_line("eval", "--data", f"{kind}:{data}")
    assert line == f"megedit: error: {where}: not valid JSON (nested too deeply to read)"


@pytest.mark.parametrize("name, text", [("deep.yaml", f"layer: {DEEP}\n"), ("deep.json", f'{{"layer": {DEEP}}}')])
def test_a_deeply_nested_config_is_one_line_before_any_model_loads(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    data = _jsonl(tmp_path)
    line = _error_line("fit", "--data", f"jsonl:{data}", "--pseudo", f"jsonl:{data}", "--config", config,
                       "--out", tmp_path / "pack")
    assert line == f"megedit: error: {config}: not a readable config file (nested too deeply to read)"


# -- command-line values ------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag, value", [
    (["eval", "--data", "jsonl:x", "--batch-size", "0"], "--batch-size", "0"),
    (["eval", "--data", "jsonl:x", "--max-new-tokens", "0"], "--max-new-tokens", "0"),
    (["eval", "--data", "jsonl:x", "--max-new-tokens", "-5"], "--max-new-tokens", "-5"),
    (["eval", "--data", "jsonl:x", "--limit", "-1"], "--limit", "-1"),
    (["generate", "pack", "q", "--max-new-tokens", "0"], "--max-new-tokens", "0"),
    (["generate", "pack", "q", "--max-new-tokens", "-1"], "--max-new-tokens", "-1"),
    (["fit-neurons", "--data", "jsonl:x", "--out", "o", "--batch-size", "two"], "--batch-size", "two"),
    (["fit", "--data", "jsonl:x", "--out", "o", "--processes", "0"], "--processes", "0"),
])
def test_a_count_that_is_not_a_positive_integer_is_a_one_line_usage_error(args, flag, value):
    verb = args[0]
    assert _error_line(*args) == f"megedit {verb}: error: argument {flag}: expected a positive integer, found {value!r}"


@pytest.mark.parametrize("verb", ["sweep-layers", "eval"])
def test_layers_must_be_integers(verb):
    assert _error_line(verb, "--data", "jsonl:x", "--layers", "3,abc") == (
        f"megedit {verb}: error: argument --layers: expected comma-separated layers (integers from 0), found '3,abc'")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_before_the_pack_is_read(tmp_path, prompt):
    line = _error_line("generate", tmp_path / "no-pack-here", "The capital of France is", prompt)
    assert line == f"megedit generate: error: argument prompts: expected non-empty text, found {prompt!r}"


# -- models and edit packs ----------------------------------------------------------------------


def test_a_model_folder_with_a_pickled_model_object_is_one_line(tmp_path):
    folder = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model, folder / "pytorch_model.bin")  # the whole object, not a state dict: unpickling runs code
    line = _error_line("eval", "--data", f"jsonl:{_jsonl(tmp_path)}", "--model", folder)
    assert line.startswith(f"megedit: error: could not load '{folder}': its pickle checkpoint")
    assert line.endswith("save the model as safetensors")


def _rewrite(pack, change, sign: bool):
    """Change pack.json by hand; `sign` also updates its checksum (as a careful forger would)."""
    path = pack / "pack.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if sign:
        manifest["manifest_sha256"] = manifest_sha256(manifest)
    path.write_text(json.dumps(manifest))


def _load(pack):
    model = tiny_model("llama", init_range=0.2)  # the fixture's base model, fresh (no neuron attached)
    return EditedModel.from_pretrained(pack, model, char_tokenizer(), encoder=tiny_encoder())


@pytest.mark.parametrize("change", [
    lambda m: m["spec"].update(layer=0),
    lambda m: m["prompt_format"].update(template="Q: {query} A:"),
    lambda m: m.update(epsilon=0.5),
    lambda m: m.pop("manifest_sha256"),
])
def test_a_hand_edited_pack_json_is_refused(fitted, tmp_path, change):  # noqa: F811
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    read_manifest(pack)  # as written: whole
    _rewrite(pack, change, sign=False)
    message = f"{pack / 'pack.json'}: changed since the pack was written (its checksum does not match its content)"
    with pytest.raises(MeGError) as error:
        _load(pack)
    assert str(error.value) == message
    assert _error_line("inspect", pack) == f"megedit: error: {message}"


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["prompt_format"].update(template="Q: {query} {answer}"), "the template must hold '{query}'"),
    (lambda m: m["prompt_format"].update(template="no query here"), "the template must hold '{query}'"),
    (lambda m: m["prompt_format"].update(template="{query"), "the template must hold '{query}'"),
    (lambda m: m.update(sample_seed="7"), "sample_seed must be an integer, found '7'"),
    (lambda m: m.update(sample_seed=1.5), "sample_seed must be an integer, found 1.5"),
    (lambda m: m["spec"].update(variant="gated"), "hidden size 32) takes vectors of length 96, the generator makes "
                                                  "vectors of length 64"),
    (lambda m: m["spec"].update(hidden=16), "hidden size 16) takes vectors of length 32, the generator makes "
                                            "vectors of length 64"),
    (lambda m: m["spec"].update(variant="huge"), "neuron variant must be one of"),
])
def test_a_consistent_but_unusable_pack_json_is_refused(fitted, tmp_path, change, problem):  # noqa: F811
    edited, _ = fitted
    pack = edited.save_pretrained(tmp_path / "pack")
    _rewrite(pack, change, sign=True)
    with pytest.raises(MeGError) as error:
        _load(pack)
    assert str(error.value).startswith(f"{pack / 'pack.json'}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)
