"""Does a change leave results as they were? The same CounterFact edits fitted and evaluated by two
revisions of megedit, through the CLI, compared query by query; then the older revision's pack
evaluated by the newer code, compared again (a pack saved before the change loads after it).

    .venv/bin/python bench/same_results.py [--before REV] [--after REV] [--n 128] [--pool 2000]

--before defaults to the last revision before the house was rebuilt (runtime layer, registries,
self-describing configs); --after to this checkout's working tree. Both run with the older
revision's defaults: settings added since are set to the values that reproduce the old behaviour
(ADDED_SINCE), so only the code differs. The pseudo-edit pool is the first --pool records of
counterfact-train.json (a smaller stage B; the comparison does not need the whole pool). The two
fits run side by side, one thread each (the same thread count, so the same float sums).

Result: bench/results/same-results-cf-<n>.json (every differing query, none when the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from result_schema import write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared/data/counterfact"
BEFORE = "a166316"  # the base of the runtime and registry branches
# settings the older revision lacks, each at the value that does what that revision did
ADDED_SINCE = {("routing", "router", "negative_wordings"): 1, ("routing", "router", "other_relation_margin"): 0.0,
               ("routing", "router", "unknown_relation_margin"): 0.0, ("fit", "restart_steps"): None,
               ("fit", "restart_lr"): 0.1,  # unused without restart_steps
               ("fit", "quiet_chat_opening"): False, ("fit", "warm_start"): False,
               ("fit", "warm_lr"): 0.1,  # unused without warm_start
               ("routing", "router", "plain_margin"): 0.0, ("routing", "router", "question_gate"): None,
               ("routing", "router", "question_gate_lone"): None, ("fit", "lone_prefixes"): 0,
               ("infer_subjects",): False, ("fit", "chat_answer_space"): False}
COMPARED = ("case_id", "kind", "query", "expected", "got", "ag", "tf")


def export(revision: str | None, into: Path) -> Path:
    """The `src` folder of `revision` (None: this working tree's)."""
    if revision is None:
        return ROOT / "src"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def short_revision(revision: str | None) -> str | None:
    """The commit `revision` names, as a short hash (None stays None: the working tree)."""
    if revision is None:
        return None
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision], capture_output=True, text=True,
                          check=True).stdout.strip()


def megedit(src: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "megedit.cli", *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"megedit {args[0]} ({src}) failed:\n{done.stderr[-3000:]}")
    return done


def config_for_after(before_src: Path, after_src: Path, path: Path) -> dict:
    """The older revision's defaults plus those of ADDED_SINCE it lacks, written to `path` for the newer code and
    returned; every setting the newer code has must be in one of the two (a new setting without an old value is an
    error)."""
    import yaml

    old = yaml.safe_load(megedit(before_src, "config").stdout)
    new = yaml.safe_load(megedit(after_src, "config").stdout)
    merged = json.loads(json.dumps(old))
    for keys, value in ADDED_SINCE.items():
        section = merged
        for key in keys[:-1]:
            section = section[key]
        section.setdefault(keys[-1], value)  # a revision that has the setting keeps its own default
    missing = sorted(_leaves(new) - _leaves(merged))
    if missing:
        raise SystemExit(f"settings the older revision lacks, with no value in ADDED_SINCE: {missing}")
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return merged


def _leaves(tree: dict, at: tuple = ()) -> set[tuple]:
    return {leaf for k, v in tree.items()
            for leaf in (_leaves(v, at + (k,)) if isinstance(v, dict) and v else {at + (k,)})}


def fit_and_eval(src: Path, work: Path, data: list[str], fit_args: list[str]) -> dict:
    pack = work / "pack"
    megedit(src, "fit", *data, "--out", str(pack), "--work-dir", str(work / "stages"), "--quiet", *fit_args)
    return evaluate(src, pack, work / "eval.json", data)


def evaluate(src: Path, pack: Path, report: Path, data: list[str]) -> dict:
    megedit(src, "eval", str(pack), *data[:4], "--json", str(report), "--quiet")
    return json.loads(report.read_text())


def differences(a: dict, b: dict) -> list[dict]:
    """Each query whose row differs (the compared fields), and the metrics and chat rates if they differ."""
    rows = []
    if len(a["cases"]) != len(b["cases"]):
        return [{"what": "number of queries", "before": len(a["cases"]), "after": len(b["cases"])}]
    for x, y in zip(a["cases"], b["cases"]):
        seen = {k: (x.get(k), y.get(k)) for k in COMPARED}
        if any(u != v for u, v in seen.values()):
            rows.append({"what": "query", **{k: list(v) for k, v in seen.items()}})
    for key in ("metrics", "chat"):
        if a.get(key) != b.get(key):
            rows.append({"what": key, "before": a.get(key), "after": b.get(key)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--after", default=None, help="a revision; default: this working tree")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--pool", type=int, default=2000)
    args = parser.parse_args()
    args.before, args.after = (short_revision(r) for r in (args.before, args.after))
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        tmp = Path(tmp)
        (tmp / "before").mkdir(), (tmp / "after").mkdir()
        before_src = export(args.before, tmp / "before")
        after_src = export(args.after, tmp / "after")
        pool = tmp / "pool.json"
        pool.write_text(json.dumps(json.loads((SHARED / "counterfact-train.json").read_text())[: args.pool]))
        data = ["--data", f"counterfact:{SHARED / 'counterfact-edit.json'}", "--limit", str(args.n),
                "--pseudo", f"counterfact:{pool}"]
        config_file = tmp / "after-config.yaml"
        config = config_for_after(before_src, after_src, config_file)
        with ThreadPoolExecutor(2) as both:
            runs = [both.submit(fit_and_eval, before_src, tmp / "before", data, []),
                    both.submit(fit_and_eval, after_src, tmp / "after", data, ["--config", str(config_file)])]
            before, after = (run.result() for run in runs)
        crossed = evaluate(after_src, tmp / "before" / "pack", tmp / "crossed.json", data)
    result = {"before": args.before, "after": args.after or "working tree", "n": args.n, "pool": args.pool,
              "added_since": {".".join(k): v for k, v in ADDED_SINCE.items()},
              "queries": len(before["cases"]), "metrics": before["metrics"], "chat": before.get("chat"),
              "fit_and_eval": differences(before, after), "old_pack_new_code": differences(before, crossed)}
    out = HERE / "results" / f"same-results-cf-{args.n}.json"
    write_result(out, result, model="smollm2", fingerprint=None, n=args.n, seed=0, method="meg", config=config,
                 threads=1, data={"edits": SHARED / "counterfact-edit.json", "pool": SHARED / "counterfact-train.json"},
                 unknown={"model.fingerprint": "the runs load the model in their own processes"})
    same = not result["fit_and_eval"] and not result["old_pack_new_code"]
    print(f"{result['queries']} queries: fit + eval {'the same' if not result['fit_and_eval'] else 'DIFFER'}; "
          f"old pack with new code {'the same' if not result['old_pack_new_code'] else 'DIFFERS'} -> {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
