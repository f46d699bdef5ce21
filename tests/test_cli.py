import json
import subprocess
import sys
import time

MEGEDIT = [sys.executable, "-m", "megedit.cli"]


def _run(*args, timeout=120):
    return subprocess.run([*MEGEDIT, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_verbs():
    out = _run("--help")
    assert out.returncode == 0 and "eval" in out.stdout
    out = _run("eval", "--help")
    assert out.returncode == 0 and "--method" in out.stdout and "KIND:PATH" in out.stdout


def test_import_is_cheap_and_has_no_side_effects():
    code = ("import sys, time, logging; t = time.perf_counter(); import megedit; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules, "
            "logging.getLogger().handlers == [])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, torch_loaded, hf_loaded, no_handlers = out.stdout.split()
    assert float(seconds) < 1.0
    assert (torch_loaded, hf_loaded, no_handlers) == ("False", "False", "True")


def test_bad_data_gives_one_line_naming_the_file_record_and_field(tmp_path):
    out = _run("eval", "--data", f"counterfact:{tmp_path / 'missing.json'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"megedit: error: {tmp_path / 'missing.json'}: no such file"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "p", "target_new": 5}]))
    out = _run("eval", "--data", f"counterfact:{bad}")
    assert out.stderr.strip() == ("megedit: error: bad.json: record 0: field 'target_new': "
                                  "expected a non-empty string, found int 5")
    out = _run("eval", "--data", "wiki:x.json")
    assert out.returncode == 2 and "--data must be KIND:PATH" in out.stderr


def test_unloadable_model_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    start = time.perf_counter()
    out = _run("eval", "--data", f"jsonl:{data}", "--model", str(tmp_path / "no-model-here"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"megedit: error: could not load '{tmp_path / 'no-model-here'}'")
    assert time.perf_counter() - start < 60
