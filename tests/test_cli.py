import json
import subprocess
import sys
import time

import pytest

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
    out = _run("fit-neurons", "--data", f"counterfact:{bad}", "--out", str(tmp_path / "f"), "--part", "3/2")
    assert out.returncode == 2 and out.stderr.strip() == (
        "megedit: error: --part: expected K/N with 1 <= K <= N, found '3/2'")
    out = _run("fit-neurons", "--data", f"counterfact:{bad}", "--out", str(tmp_path / "f"), "--processes", "2")
    assert out.returncode == 2 and out.stderr.strip() == (
        "megedit: error: --processes needs --work-dir (its parts write their shards there) and no --part")


def test_unloadable_model_is_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "target": "t"}) + "\n")
    start = time.perf_counter()
    out = _run("eval", "--data", f"jsonl:{data}", "--model", str(tmp_path / "no-model-here"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"megedit: error: could not load '{tmp_path / 'no-model-here'}'")
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_demo_then_generate_eval_and_inspect_on_the_saved_pack(tmp_path):
    """The main job end to end on SmolLM2 (a short generator run), and the pack in fresh processes."""
    pack, work = tmp_path / "pack", tmp_path / "work"
    out = _run("--quiet", "demo", "--work-dir", str(work), "--generator-steps", "300", "--out", str(pack), timeout=900)
    assert out.returncode == 0, out.stderr
    table = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| edit | The capital of France")]
    assert table and table[0][2:4] == ["Paris.", "Rome"]  # before, after
    scores = [line for line in out.stdout.splitlines() if line.startswith("| meg |")][0].split(" | ")
    assert float(scores[1]) >= 90 and float(scores[5]) == 100.0  # Reliability AG; Locality AG (routed off)

    out = _run("generate", str(pack), "The capital of France is", "The number of days in a week is",
               "The Eiffel Tower was built in the year", timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].strip() == "edited: Rome" and lines[2].strip() == "base:   Paris."
    assert lines[5].strip() == lines[6].strip().replace("base:  ", "edited:")  # unrelated: unchanged
    # another question about an edited subject, near the edit: the question gate keeps the base answer
    assert lines[9].strip() == lines[10].strip().replace("base:  ", "edited:")
    assert "another question about its subject" in lines[11]

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "The capital of France is", "target": "Rome",
                                "rephrases": ["France has its capital in the city of"],
                                "locality": ["The chemical symbol for gold is"]}) + "\n")
    out = _run("--quiet", "eval", str(pack), "--data", f"jsonl:{data}", "--json", str(tmp_path / "e.json"), timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["method"] == "meg" and report["metrics"]["reliability"]["ag"] == 100.0
    assert report["edit"]["generator"] == "lookup" and not (tmp_path / "e.json.partial").exists()

    out = _run("inspect", str(pack), "--data", f"jsonl:{data}", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "12 edits on smollm2" in out.stdout and (pack / "router-distance.png").stat().st_size > 1000
