"""Stages B and C (encoder and familiarity router) on the benchmark edit sets, via `megedit fit-router`.

    .venv/bin/python bench/routing.py counterfact            # first 1,024 CounterFact edits, pool counterfact-train
    .venv/bin/python bench/routing.py zsre-split             # ZsRE: edit the first 800, pool = the last 200
    .venv/bin/python bench/routing.py zsre-cross             # ZsRE: edit all 1,000, pool = counterfact-train
    .venv/bin/python bench/routing.py counterfact --tag entropy -- --router entropy   # a variant

Each run records paraphrase retrieval top-1 among the edit prompts (frozen vs tuned MiniLM), the
epsilon chosen on the pool, the share of edit prompts / rephrases / locality prompts routed
familiar, the curve over epsilon, training times, and the router-distance histogram:
bench/results/routing-<cf|zs-cross|zs-split>[-tag].json and .png (bench/update_readme.py shows them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from result_names import tag
from result_schema import write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data"
CF_EDIT, CF_POOL = SHARED / "counterfact/counterfact-edit.json", SHARED / "counterfact/counterfact-train.json"
ZSRE = SHARED / "zsre/zsre_mend_train-1k.json"

SETTINGS = {
    "counterfact": ["--data", f"counterfact:{CF_EDIT}", "--limit", "1024", "--pseudo", f"counterfact:{CF_POOL}"],
    "zsre-split": ["--data", f"zsre:{ZSRE}", "--limit", "800", "--skip-invalid"],  # pool: records 800..999
    "zsre-cross": ["--data", f"zsre:{ZSRE}", "--skip-invalid", "--pseudo", f"counterfact:{CF_POOL}"],
}


def data_files(setting: str) -> dict[str, Path]:
    """A setting's edits file and its pool file (none where the pool is the edits' own later records)."""
    argv, roles = SETTINGS[setting], {"--data": "edits", "--pseudo": "pool"}
    return {roles[flag]: Path(argv[i + 1].split(":", 1)[1]) for i, flag in enumerate(argv) if flag in roles}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--tag", default="", help="suffix for the result files of a variant")
    parser.add_argument("extra", nargs="*", help="more fit-router options, after --")
    args = parser.parse_args()

    from megedit.cli import main as megedit

    variant = f"-{args.tag}" if args.tag else ""
    work = HERE / "results" / "cases" / f"routing-{args.setting}{variant}"
    result = HERE / "results" / f"routing-{tag(args.setting)}{variant}"
    code = megedit(["fit-router", *SETTINGS[args.setting], "--out", str(work), *args.extra])
    if code == 0:
        routing = json.loads((work / "routing.json").read_text())
        write_result(result.with_suffix(".json"), routing, model=None, n=routing["n_edits"],
                     seed=routing["config"]["seed"], method="meg stages B and C (encoder, router)",
                     config=routing["config"], data=data_files(args.setting),
                     unknown={"model.name": "the MiniLM encoder and the router only: no language model"})
        shutil.copyfile(work / "router-distance.png", result.with_suffix(".png"))
    return code


if __name__ == "__main__":
    sys.exit(main())
