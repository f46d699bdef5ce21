"""Where the router's false-fire ceiling binds: for every router bench/meg.py calibrated, the
threshold chosen with no ceiling (best recall - false fire on the held-out pool slice) and under
each ceiling, on every setting and N run (CounterFact, the swapped files, ZsRE).

    .venv/bin/python bench/router_ceiling.py

Reads the calibration curves in bench/results/cases/meg-*/routing/ (bench/meg.py's caches) and
cases/pipeline-swap-*/work/routing/ (bench/pipeline.py --swap: the files' roles swapped; the curve
does not depend on the ceiling, so one router per setting and N is enough) into
bench/results/router_ceiling.json, keeping the runs it held before. No model runs: a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
CEILINGS = (None, 25.0, 20.0, 15.0, 10.0)
ROUTER = "nearest"  # the router kind whose calibration curves this reads (the default, MeG's)


def main() -> int:
    from megedit.stages.router import choose_epsilon

    out = HERE / "results" / "router_ceiling.json"
    # the runs found before stay (their caches may be gone); a router found again replaces its run
    runs = {(r["setting"], r["n"]): r for r in (payload(out)["runs"] if out.exists() else [])}
    cases = HERE / "results" / "cases"
    found = [(p, p.parts[-4][len("meg-"):]) for p in cases.glob("meg-*/routing/*/router.json")]
    found += [(p, "counterfact-swap") for p in cases.glob("pipeline-swap-*/work/routing/*/router.json")]
    for path, setting in sorted(found):
        saved = json.loads(path.read_text())
        curve = saved["record"]["calibration"].get("curve")
        if not curve or saved["config"]["kind"] != ROUTER:
            continue
        n = saved["record"]["training"]["n"]
        runs[(setting, n)] = {"setting": setting, "n": n, "choices": [
            {"ceiling": c, **choose_epsilon(curve, c)} for c in CEILINGS]}
    write_result(out, {"router": ROUTER, "model": "smollm2", "encoder": "minilm (fine-tuned, stage B)",
                       "seed": 0, "runs": [runs[k] for k in sorted(runs)]},
                 model="smollm2", n=None, seed=0, method="meg router calibration",
                 config={"kind": ROUTER, "ceilings": list(CEILINGS)},
                 unknown={"n": "one run per setting and N", "model.fingerprint": "no model loaded: read from caches"})
    for r in runs.values():
        print(r["setting"], r["n"], "; ".join(f"ceiling {c['ceiling']}: eps {c['epsilon']:.3f} recall {c['recall']:.1f} "
                                             f"false fire {c['false_fire']:.1f}" for c in r["choices"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
