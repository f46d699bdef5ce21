"""Where the router's false-fire ceiling binds: for every router bench/meg.py calibrated, the
threshold chosen with no ceiling (best recall - false fire on the held-out pool slice) and under
each ceiling, on every setting and N run (CounterFact, the swapped files, ZsRE).

    .venv/bin/python bench/router_ceiling.py

Reads the calibration curves in bench/results/cases/meg-*/routing/ (bench/meg.py's caches; the
curve does not depend on the ceiling, so one router per setting and N is enough) and writes
bench/results/router_ceiling.json. No model runs: a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CEILINGS = (None, 25.0, 20.0, 15.0, 10.0)


def main() -> int:
    from megedit.io import atomic_write_json
    from megedit.stages.router import choose_epsilon

    runs = {}
    for path in sorted((HERE / "results" / "cases").glob("meg-*/routing/*/router.json")):
        saved = json.loads(path.read_text())
        curve = saved["record"]["calibration"].get("curve")
        if not curve or saved["config"]["kind"] != "nearest":
            continue
        setting, n = path.parts[-4][len("meg-"):], saved["record"]["training"]["n"]
        runs[(setting, n)] = {"setting": setting, "n": n, "choices": [
            {"ceiling": c, **choose_epsilon(curve, c)} for c in CEILINGS]}
    out = HERE / "results" / "router_ceiling.json"
    atomic_write_json(out, {"router": "nearest", "model": "smollm2", "encoder": "minilm (fine-tuned, stage B)",
                            "seed": 0, "runs": [runs[k] for k in sorted(runs)]})
    for r in runs.values():
        print(r["setting"], r["n"], "; ".join(f"ceiling {c['ceiling']}: eps {c['epsilon']:.3f} recall {c['recall']:.1f} "
                                             f"false fire {c['false_fire']:.1f}" for c in r["choices"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
