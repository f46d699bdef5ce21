"""Rewrite the README's results tables from the summary JSON files in bench/results/.

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md;
everything between the markers is replaced. Numbers come only from the result files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METRICS = [("reliability", "ag"), ("reliability", "tf"), ("generality", "ag"), ("generality", "tf"),
           ("locality", "ag"), ("locality", "tf")]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows])


def _load(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]


def baselines_table() -> str:
    rows = []
    for r in _load("baseline-*.json"):
        fmt = r["protocol"]["prompt_format"]["name"]
        cells = [r["data"].split(":")[0], str(r["n"]), r["method"], str(r["edit"].get("layer", "—"))]
        cells += [f"{r['metrics'][k][s]:.2f}" for k, s in METRICS] + [f"{r['score']:.2f}"]
        cells += [f"{r['edit_time_s']:.0f}", f"{r['timing']['total_s']:.0f}", fmt, str(r["seed"])]
        rows.append(cells)
    return _table(["data", "N", "method", "layer", "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF", "Score",
                   "edit s", "eval s", "format", "seed"], rows)


def eval_cost_table() -> str:
    rows = []
    for r in _load("baseline-*-none.json"):
        t = r["timing"]
        scored = t["total_s"] - t["locality_reference_s"]
        queries = sum(r["protocol"]["counts"].values())
        rows.append([r["data"].split(":")[0], str(r["n"]), str(queries), f"{t['locality_reference_s']:.0f}",
                     f"{scored:.0f}", f"{t['total_s']:.0f}",
                     f"{100 * t['decoding_steps_s'] / max(scored, 1e-9):.0f}%"])
    return _table(["data", "N", "queries", "pre-edit reference s (once, cached)", "scored run s", "total s",
                   "share in step-by-step decoding"], rows)


def fit_speed_table() -> str:
    rows = []
    for r in _load("fit_neurons-speedup-*.json"):
        for check in ("tf", "generate"):
            naive = r.get(f"naive_{check}")
            if naive:
                rows.append([str(r["n"]), str(r["config"]["layer"]), check, f"{naive['seconds']:.0f}",
                             f"{naive['success_rate']:.1f}", f"{r['batched']['seconds']:.0f}",
                             f"{r['batched']['success_rate']:.1f}", f"{naive['speedup']:.1f}x"])
    return _table(["N", "layer", "naive loop's success test", "naive s", "naive success %", "batched s",
                   "batched success %", "speed-up"], rows)


def fit_scale_table() -> str:
    rows = []
    for r in _load("fit_neurons-scale-*.json"):
        m = r["fitted_vector_eval"]["metrics"]
        rows.append([str(r["n"]), str(r["config"]["layer"]), f"{r['success_rate']:.1f}", f"{r['median_steps']:.0f}",
                     f"{r['fit_s']:.0f}", f"{r['edits_per_s']:.2f}", f"{r['projected_10k_s'] / 3600:.1f}",
                     f"{r['peak_rss_mb']:.0f}"]
                    + [f"{m[k][s]:.1f}" for k, s in METRICS])
    return _table(["N", "layer", "success %", "median steps", "fit s", "edits/s", "10K projection h", "peak RSS MB",
                   "RelAG", "RelTF", "GenAG", "GenTF", "LocAG", "LocTF"], rows)


def layer_sweep_table() -> str:
    rows = []
    for r in _load("fit_neurons-sweep-*.json"):
        for row in r["rows"]:
            m = row["metrics"]
            rows.append([str(r["n"]), str(row["layer"]), f"{row['success_rate']:.1f}", f"{row['median_steps']}",
                         f"{row['fit_s']:.0f}"] + [f"{m[k][s]:.1f}" for k, s in METRICS])
    return _table(["N", "layer", "success %", "median steps", "fit s", "RelAG", "RelTF", "GenAG", "GenTF",
                   "LocAG", "LocTF"], rows)


TABLES = {"baselines": baselines_table, "eval-cost": eval_cost_table, "fit-speed": fit_speed_table,
          "fit-scale": fit_scale_table, "layer-sweep": layer_sweep_table}


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, build in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            print(f"README.md has no markers for {name}", file=sys.stderr)
            return 1
        text = pattern.sub(lambda m: m.group(1) + build() + "\n" + m.group(2), text)
    readme.write_text(text)
    print("README.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
