"""The scale curve: MeG, FT, MEMIT and AlphaEdit on the first N CounterFact edits with SmolLM2,
for N = 1,024 / 2,048 / 4,096 / 10,000, scored by the same harness.

    .venv/bin/python bench/scale_curve.py                         # run what is missing, then draw
    .venv/bin/python bench/scale_curve.py --sizes 1024,4096 --methods memit,alphaedit
    .venv/bin/python bench/scale_curve.py --draw                  # only collect and draw
    .venv/bin/python bench/scale_curve.py --sizes 10000 --value-parts 2   # 2 cores: search values in 2 processes
    .venv/bin/python bench/scale_curve.py --sizes 10000 --processes 2     # evaluations (and MeG's stage A) too

Each point is one run of bench/baselines.py (ft, memit, alphaedit) or bench/meg.py (meg) in its
own process, writing its own result file as it finishes; a point whose file exists is not run
again (unless it was made with a setup of before: `current`), and inside a point the stages,
value searches and evaluation references are cached, so a killed run (this takes many hours on
a 2-core CPU) restarts where it stopped. Points run by size, smallest first, so partial results
are there as soon as possible. The collected points
go to bench/results/scale_curve.json and bench/results/scale_curve.png (Score and each metric
against N; bench/update_readme.py shows the table).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from figures import pyplot, save_png
# VALUE_SEARCHERS: the methods with a target-value search per edit (MEMIT / AlphaEdit), split by --value-parts
from megedit.baselines.config import METHODS as VALUE_SEARCHERS, FTConfig, MemitConfig
from megedit.methods import METHODS as REGISTRY, WEIGHT_EDITORS
from result_schema import payload, write_result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = tuple(REGISTRY)  # meg, ft, memit, alphaedit
SIZES = (1024, 2048, 4096, 10000)
PANELS = [("score", None), ("reliability", "ag"), ("reliability", "tf"), ("generality", "ag"),
          ("generality", "tf"), ("locality", "ag"), ("locality", "tf"), ("edit_time_s", None)]


def fitted(method: str) -> bool:
    """Whether `method` is fitted into a pack by `megedit fit` (MeG: bench/meg.py runs it) rather
    than editing the weights in place (bench/baselines.py) or leaving them as they are ("none")."""
    return method in REGISTRY and method not in WEIGHT_EDITORS


def result_file(method: str, n: int) -> Path:
    """Where bench/meg.py and bench/baselines.py write the point (N, method)."""
    if fitted(method):
        return RESULTS / ("meg-cf.json" if n == 1024 else f"meg-cf-{n}.json")
    return RESULTS / f"baseline-cf-{n}-{method}.json"


# the baselines' settings, chosen on the first 128 edits (bench/baseline_sweep.py; docs/results.md):
# the causal-traced span, MEMIT's lambda where its Score peaks, AlphaEdit's published ridge term;
# by the method each run spec names
BASELINE_RUNS = {spec.split(":")[0]: spec for spec in ("ft", "memit:2000:1-5", "alphaedit:10:1-5")}


def command(method: str, n: int, values_part: tuple[int, int] | None = None, processes: int = 1) -> list[str]:
    """The point's process (its stage A / evaluation in `processes` one-thread processes); with
    `values_part` (I, K), the one that searches the I-th of K slices of its target values
    (memit / alphaedit) into the cache the point then reads."""
    if fitted(method):
        return [sys.executable, str(HERE / "meg.py"), "counterfact", "--limit", str(n), "--no-speed",
                "--processes", str(processes)]
    # no context prefixes: with them the value search takes ~92 s per edit here (docs/results.md)
    return [sys.executable, str(HERE / "baselines.py"), "--data", "counterfact", "--limit", str(n),
            "--methods", BASELINE_RUNS[method], "--contexts", "0",
            *(["--values-part", "{}/{}".format(*values_part)] if values_part
              else ["--force", "--eval-processes", str(processes)])]


def search_values_in_parts(method: str, n: int, parts: int) -> int:
    """Fill the target-value cache of a memit / alphaedit point in `parts` one-thread processes side
    by side (the search is most of such a point's time); the first failed part's exit code, else 0
    (a part killed by a signal has a negative one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command(method, n, (i, parts)), cwd=HERE.parent, env=env) for i in range(1, parts + 1)]
    codes = [proc.wait() for proc in procs]
    return next((code for code in codes if code), 0)


def run_point(method: str, n: int, value_parts: int, processes: int = 1) -> int:
    """One point in its own process (after its value search in parts, where asked); its exit code."""
    if value_parts > 1 and method in VALUE_SEARCHERS:
        code = search_values_in_parts(method, n, value_parts)
        if code:
            return code
    return subprocess.run(command(method, n, processes=processes), cwd=HERE.parent).returncode


def done(method: str, n: int) -> bool:
    """A point is there when its file exists and was made with today's setup."""
    path = result_file(method, n)
    return path.exists() and current(method_label(payload(path)))


def edit_seconds(summary: dict) -> tuple[float, str]:
    """Wall time of the edit itself, and a note where part of it was measured elsewhere."""
    if "edit_time_s" in summary:
        edit = summary.get("edit", {})
        if edit.get("values_reused_s"):  # target values of some edits came from an earlier run's search
            return summary["edit_time_s"] + edit["values_reused_s"], "cached target-value search added"
        if edit.get("values_reused_batches") and edit.get("values_search_s") is not None:  # older runs: all or none
            return summary["edit_time_s"] + edit["values_search_s"], "cached target-value search added"
        return summary["edit_time_s"], ""
    stages, notes = meg_stage_seconds(summary)
    timing = summary["fit"]["timing"]
    outside_stages = timing["total_s"] - sum(timing[k]["seconds"] for k in stages)  # the editor's own bookkeeping
    return sum(stages.values()) + outside_stages, "; ".join(notes)


def meg_stage_seconds(summary: dict) -> tuple[dict[str, float], list[str]]:
    """MeG's stage times (A, BC, D), each with the work that a cache or an earlier process did
    for this run added back, and a note for each addition."""
    timing = summary["fit"]["timing"]
    a, encoder = timing["A"], timing["BC"].get("encoder", {})
    seconds, notes = {k: timing[k]["seconds"] for k in ("A", "BC", "D")}, []
    if a.get("cached") and "reused_s" in a and (a.get("fit_s") or 0) > 60:  # a fit restored whole: add what it took then
        seconds["A"] += a["fit_s"] + a["reused_s"]
        notes.append("stage A restored from cache, its fit time added")
    elif a.get("reused_s"):  # some edits' vectors came from an earlier fit's shards: add what fitting them took
        seconds["A"] += a["reused_s"]
        notes.append("fitting of reused edits added")
    elif a.get("cached") is not False or a["seconds"] <= 5:  # older runs: stage A restored whole
        scale = RESULTS / f"fit_neurons-scale-{summary['n']}.json"
        if scale.exists():
            seconds["A"] = payload(scale)["fit_s"]
            notes.append("stage A timed in fit_neurons-scale")
        else:
            notes.append("stage A restored, its time not included")
    if encoder.get("cached"):  # the tuned encoder came from an earlier fit on the same pool
        seconds["BC"] += encoder["train_s"] - encoder["seconds"]
        notes.append("encoder training time added")
    # a restarted run (e.g. killed during its evaluation) loads the router and generator it trained
    router_wall = timing["BC"]["seconds"] - encoder.get("seconds", 0.0)
    if router_wall < timing["BC"]["router_s"]:
        seconds["BC"] += timing["BC"]["router_s"] - router_wall
        notes.append("router training time added")
    d = timing["D"]
    if d.get("train_s") and d["seconds"] < d["train_s"]:
        seconds["D"] = d["train_s"]
        notes.append("generator training time added")
    return seconds, notes


def _meg_label(r: dict) -> str:
    """'meg (mlp generator)', naming what differs from the defaults: a generator budget other than
    the default passes, the edits' wordings left out (benchmark switch), a run made with the
    defaults from before stage A fitted other wordings, another wording schedule or another
    false-fire ceiling of the router's calibration."""
    from megedit import MeGConfig

    generator, fit = r["config"]["generator"], r["config"]["fit"]
    parts = [f"{generator['kind']} generator"]
    if r.get("model", "smollm2") != "smollm2":
        parts.insert(0, r["model"])
    if "paraphrases" in fit and "negatives" not in r["config"]["routing"]["router"]:
        parts.append("no negatives, no chat wording")  # made before edits had negatives and a chat wording
    if "paraphrases" not in fit:
        parts.append("prompt-only defaults of before")
    elif fit.get("wording_schedule", "all") != MeGConfig().fit.wording_schedule:
        parts.append(f"stage A trains {fit.get('wording_schedule', 'all')} wordings each step")
    if "chat_wording" in fit and fit["max_steps"] != MeGConfig().fit.max_steps:
        parts.append(f"stage A max_steps {fit['max_steps']}")
    if generator.get("passes") is None:
        parts.append(f"{r['fit']['generator']['steps']:,} steps")
    elif generator["passes"] != MeGConfig().generator.passes:
        parts.append(f"{generator['passes']:g} passes")
    if generator.get("mlp", {}).get("hidden"):
        parts.append(f"width {generator['mlp']['hidden']}")
    if r.get("edits_applied", r["n"]) != r["n"]:
        parts.append(f"all {r['edits_applied']:,} applied, first {r['n']:,} scored")
    lone = fit.get("lone_prefixes", 0)  # runs from before the setting had none
    if "negatives" in r["config"]["routing"]["router"] and lone != MeGConfig().fit.lone_prefixes:
        parts.append(f"{lone or 'no'} prefixes for an edit with its prompt alone")
    if fit.get("exclude_eval_templates", "none") != "none":
        parts.append(f"test wordings held out: {fit['exclude_eval_templates']}")
    ceiling = r["config"]["routing"]["router"].get("max_false_fire")
    if ceiling != MeGConfig().routing.router.max_false_fire and "paraphrases" in fit:
        parts.append("no false-fire ceiling" if ceiling is None else f"false-fire ceiling {ceiling:g}%")
    return f"meg ({', '.join(parts)})"


def threads(summary: dict) -> str | None:
    """The run's thread count (bench/meg.py records it at the top, bench/baselines.py under
    "machine"), and the forked one-thread processes of its stage A / evaluation where it used them."""
    count = summary.get("threads") or summary.get("machine", {}).get("cpu_threads")
    processes = summary.get("processes") or summary.get("machine", {}).get("eval_processes") or 1
    if count is None or processes == 1:
        return None if count is None else str(count)
    return f"{count}; {'stage A and ' if 'processes' in summary else ''}eval {processes} x 1"


# how the results write each baseline's main setting (megedit.methods: Method.main_setting)
WEIGHT_SYMBOLS = {"mom2_weight": "lambda", "l2": "a", "lr": "lr"}


def _memit_label(r: dict) -> str:
    """'memit (lambda 2000, layers 1-5, 0 prefixes, KL 0.0625)', or the setup of before."""
    edit, name = r.get("edit", {}), r["method"]
    span = f"layers {min(edit['layers'])}-{max(edit['layers'])}"
    if "context_prefixes" not in edit:
        return f"{name} (setup of before: pool-prompt covariance)"
    setting = REGISTRY[name].main_setting
    weight = f"{WEIGHT_SYMBOLS[setting]} {edit[setting]:g}"
    return f"{name} ({weight}, {span}, {edit['context_prefixes']} prefixes, KL {edit['kl_factor']:g})"


def _ft_label(r: dict) -> str:
    """'ft (layer 24, SGD lr 3, 8 epochs)' or, with Adam or the FT-L box, its stopping loss."""
    edit = r.get("edit", {})
    if edit.get("optimizer", "sgd") == "sgd" and not edit.get("norm_constraint"):
        return f"ft (layer {edit['layer']}, SGD lr {edit['lr']:g}, {edit['epochs']} epochs)"
    box = f", FT-L box {edit['norm_constraint']:g}" if edit.get("norm_constraint") else ""
    return f"ft (layer {edit['layer']}, {edit['optimizer']} lr {edit['lr']:g}{box}, stop at loss {edit['stop_loss']:g})"


# a weight editor's label, by the settings class its method uses (megedit.methods: Method.config)
_LABELS = {FTConfig: _ft_label, MemitConfig: _memit_label}


def method_label(r: dict) -> str:
    """The method of a result file and, where it matters for reading the number, its setup."""
    if fitted(r["method"]):
        return _meg_label(r)
    if r["method"] in WEIGHT_EDITORS:
        return _LABELS[REGISTRY[r["method"]].config](r)
    return r["method"]


def current(label: str) -> bool:
    """Whether a point was made with today's setup (the curve draws only those)."""
    return "before" not in label and "steps)" not in label


def collect(sizes: list[int], methods: list[str]) -> list[dict]:
    points = []
    for n in sizes:
        for method in methods:
            path = result_file(method, n)
            if not path.exists():
                continue
            summary = payload(path)
            seconds, note = edit_seconds(summary)
            edit = summary.get("edit", {})
            points.append({"method": method, "label": method_label(summary), "n": summary["n"], "score": summary["score"],
                           "metrics": summary["metrics"],
                           "edit_time_s": seconds, "edit_time_note": note, "eval_time_s": summary["timing"]["total_s"],
                           "threads": threads(summary),
                           # only runs from before the search recorded its time need the heuristic below
                           "file": path.name,
                           "values_cache": edit.get("values_cache") if edit.get("values_search_s") is None else None})
    # runs from before the value search recorded its time: of the points sharing one cached search,
    # the slowest ran it; the others' edit time leaves it out
    for p in points:
        shared = [q for q in points if q["values_cache"] and q["values_cache"] == p["values_cache"]]
        searcher = max(shared, key=lambda q: q["edit_time_s"]) if shared else p
        if searcher is not p and not p["edit_time_note"]:
            p["edit_time_note"] = f"target values reused from the {searcher['method']} run (not included)"
    return points


def value(point: dict, metric: str, kind: str | None) -> float:
    return point[metric] if kind is None else point["metrics"][metric][kind]


def draw(points: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5), dpi=100)
    for ax, (metric, kind) in zip(axes.flat, PANELS):
        for method in METHODS:
            mine = sorted((p for p in points if p["method"] == method and current(p["label"])), key=lambda p: p["n"])
            if metric == "edit_time_s":  # a time that leaves out part of the edit is not drawn
                mine = [p for p in mine if "not included" not in p["edit_time_note"]]
            if mine:
                ax.plot([p["n"] for p in mine], [value(p, metric, kind) for p in mine], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(SIZES, [f"{n:,}" for n in SIZES], fontsize=7)
        ax.minorticks_off()
        ax.set_xlim(800, 13000)
        if kind is not None or metric == "score":
            ax.set_ylim(-3, 103)
        ax.set_title(metric if kind is None else f"{metric} {kind.upper()}", fontsize=10)
        if metric == "edit_time_s":
            ax.set_yscale("log")
            ax.set_title("edit time (s)", fontsize=10)
        ax.set_xlabel("edits (N)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, first N CounterFact edits, seed 0 (megedit harness)", fontsize=10)
    return save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--draw", action="store_true", help="do not run anything; collect and draw")
    parser.add_argument("--value-parts", type=int, default=1, metavar="K",
                        help="memit / alphaedit: search the target values in K one-thread processes side by side "
                             "first (2 on a 2-core machine; a point searched before finds them cached)")
    parser.add_argument("--processes", type=int, default=1, metavar="K",
                        help="each point's evaluation (and MeG's stage A) in K forked one-thread processes")
    args = parser.parse_args()
    sizes = sorted(int(x) for x in args.sizes.split(","))
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if min(args.value_parts, args.processes) < 1:
        raise SystemExit(f"--value-parts and --processes must be at least 1, got {args.value_parts}, {args.processes}")
    if not args.draw:
        for n in sizes:
            for method in methods:
                if done(method, n):
                    continue
                print(f"scale curve: {method} at N={n} ...", flush=True)
                start = time.perf_counter()
                code = run_point(method, n, args.value_parts, args.processes)
                if code:
                    print(f"scale curve: {method} at N={n} failed (exit {code})", file=sys.stderr)
                    return code
                print(f"scale curve: {method} at N={n} took {time.perf_counter() - start:.0f} s", flush=True)
    points = collect(sorted(set(sizes) | set(SIZES)), list(METHODS))
    write_result(RESULTS / "scale_curve.json", {
        "protocol": "first N records of counterfact-edit.json, raw cloze prompts, all N edits applied at once, "
                    "METHOD.md section 3 metrics (megedit.eval); SmolLM2-135M-Instruct fp32, CPU, seed 0",
        "points": points}, model="smollm2", n=None, seed=0, method=None, config=None,
        unknown={"n": "a curve over several N", "method.name": "a curve over several methods",
                 "method.config": "each point's config is in its own result file"})
    if points:
        draw(points, RESULTS / "scale_curve.png")
    print(f"scale curve: {len(points)} points -> {RESULTS / 'scale_curve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
