"""Your own facts, as they come: a JSONL of 64 facts with a prompt and a target only (no subject, no
rephrases, no pool) fits with the defaults and no other flag, on the embedded SmolLM2, through the
CLI as a user types it (megedit's fallback pool stands in for the missing pseudo-edit pool)."""

import json
import subprocess
import sys

import pytest

from megedit.data.demo import DEMO_POOL, OWN_FACTS

pytestmark = pytest.mark.slow
MEGEDIT = [sys.executable, "-m", "megedit.cli"]


def test_64_facts_with_a_prompt_and_a_target_fit_and_evaluate_with_the_defaults(tmp_path):
    pack = tmp_path / "pack"
    fit = subprocess.run([*MEGEDIT, "fit", "--data", f"jsonl:{OWN_FACTS}", "--out", str(pack)],
                         capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "fallback pool" in fit.stderr
    # the same facts, each with an unrelated question from the demo pool (none a fact's own), to score locality on
    facts = [json.loads(line) for line in OWN_FACTS.read_text().splitlines()]
    unrelated = [q["prompt"] for line in DEMO_POOL.read_text().splitlines() for q in json.loads(line)["locality"]
                 if q["prompt"] not in {f["prompt"] for f in facts}]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({**f, "locality": [unrelated[k % len(unrelated)]]}) + "\n"
                              for k, f in enumerate(facts)))
    report = tmp_path / "report.json"
    out = subprocess.run([*MEGEDIT, "eval", str(pack), "--data", f"jsonl:{scored}", "--json", str(report)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["reliability"]["ag"] >= 99.0 and metrics["locality"]["ag"] >= 95.0, metrics

