"""Living edits (docs/living-edits.md): what adding edits to a fitted pack costs and what it does
to the edits already there. SmolLM2, CounterFact: the pack is bench/meg.py's (the first 1,024
records of counterfact-edit.json, pool counterfact-train.json, defaults, seed 0; its stages are
loaded from bench/meg.py's cache, fitting them first if they are not there); added edits are the
records after those.

    .venv/bin/python bench/living.py add          # 128 edits added, against a refit of all 1,152
    .venv/bin/python bench/living.py successive   # 10 additions of 100 edits, one after another

add: the pack is scored on its 1,024 edits; 128 edits are added (`megedit.add_edits`, the
pack's settings, the same pool) and the grown pack is scored on the old edits and on the new ones;
then all 1,152 are fitted again from scratch in one fit (every stage: the encoder too, whose pool
leaves out records that share a case id or a prompt with an edit, so it changes when they do) and
that pack is scored too. The cost ratio is the add's wall time over the refit's, measured in one
process (variants of the add's settings, --passes / --replay, are set against that run's refit).
successive: 10 additions of 100 edits each to the 1,024 pack; after each, the old 1,024 edits and
the 100 just added are scored. The curve goes to living-successive.png.
lifelong: 1,000 edits added to the 1,024 pack one at a time (`add_edits` with one edit), each timed
and usable before the next arrives; after every 100 additions the 100 just added are scored; after
the last, all 2,024 edits are scored (the six-number Score, no chats), beside lifelong-batch: the same
2,024 edits fitted in one batch (run it as its own process, beside or before; stages cached where
bench/meg.py caches them). Times and scores go to living-lifelong.json and living-lifelong.png.
lifelong-timing: the first 100 of those additions again, timed alone on this thread count, nothing
scored (living-lifelong-timing.json).

    .venv/bin/python bench/living.py lifelong-batch & .venv/bin/python bench/living.py lifelong

Every step's result is kept in bench/results/cases/living/<bench>.state.json as it finishes, and
packs after each addition are saved there, so a killed run resumes without timing anything twice.
Results: bench/results/living-add.json, living-successive.json, living-lifelong.json (+ .png);
bench/update_readme.py shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from figures import pyplot, save_png
from result_schema import payload, write_result

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data"
CF_EDIT, CF_TRAIN = SHARED / "counterfact/counterfact-edit.json", SHARED / "counterfact/counterfact-train.json"
RESULTS, CASES = HERE / "results", HERE / "results" / "cases"
WORK = CASES / "living"
N_PACK = 1024


class Bench:
    """The base model, the records, the pool, and this bench's state file (finished steps)."""

    def __init__(self, name: str, n_new: int, add_config=None) -> None:
        from megedit import load_model, load_requests

        self.name, self.add_config = name, add_config
        self.requests = load_requests("counterfact", CF_EDIT, limit=N_PACK + n_new)
        self.pool = load_requests("counterfact", CF_TRAIN)
        self.model, self.tokenizer = load_model("smollm2", device="cpu")
        self.state_path = WORK / f"{name}.state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def done(self, key: str, value: dict) -> dict:
        from megedit.io import atomic_write_json

        self.state[key] = value
        atomic_write_json(self.state_path, self.state)
        return value

    def config(self):
        from megedit import MeGConfig
        from megedit.data.prompts import DEFAULT_FOR_KIND

        return MeGConfig(prompt_format=DEFAULT_FOR_KIND["counterfact"], seed=0)  # bench/meg.py's, so its cache serves

    def fit(self, requests, work: Path):
        """A pack fitted on `requests` from scratch in `work` (stages cached there) and its wall time."""
        from megedit import MeGEditor

        start = time.perf_counter()
        edited = MeGEditor(self.model, self.tokenizer, self.config()).fit(requests, work, self.pool,
                                                                          f"counterfact:{CF_TRAIN.name}")
        return edited, time.perf_counter() - start

    def pack(self):
        """The 1,024-edit pack of bench/meg.py counterfact (its cached stages), holding its training
        pairs' embeddings as a pack from a fresh fit does (a cached stage D does not compute them)."""
        edited = self.fit(self.requests[:N_PACK], CASES / "meg-counterfact")[0]
        edited.edits.pairs(range(len(edited.edits)), edited.generator.config.augment, edited.encoder, progress=False)
        return edited

    def load(self, folder: Path):
        from megedit import EditedModel

        return EditedModel.from_pretrained(folder, self.model, self.tokenizer)

    def score(self, edited, requests, key: str, *, chats: bool = True, cases: bool = False) -> dict:
        """The harness's metrics of `edited` on `requests` (kept in the state: scored once); `chats` off: no
        chat turns (the six-number Score alone), `cases`: the rows kept too."""
        from megedit import evaluate

        if key in self.state:
            return self.state[key]
        report = evaluate(edited, requests, data_kind="counterfact", data_name=f"counterfact:{CF_EDIT.name}",
                          checkpoint=WORK / f"{self.name}-{key}.partial.json",
                          **({} if chats else {"chat_edits": 0, "progress": False}))
        summary = report.to_dict()
        kept = {"n": summary["n"], "metrics": summary["metrics"], "score": summary["score"],
                "eval_s": summary["timing"]["total_s"], "threads": torch.get_num_threads()}
        return self.done(key, kept | ({"cases": summary["cases"]} if cases else {}))

    def added(self, edited, requests, key: str):
        """`edited` with `requests` added, saved as WORK/<key>; timed once (a resumed run loads it)."""
        from megedit import add_edits

        folder, work = WORK / key, WORK / f"{key}-work"
        if f"{key}-cost" in self.state and folder.exists():
            edited.close()
            return self.load(folder), self.state[f"{key}-cost"]
        if work.exists():  # a killed add: start over, or its cached steps would make it look cheap
            shutil.rmtree(work)
        start = time.perf_counter()
        grown = add_edits(edited, requests, work, pool=self.pool, config=self.add_config)
        seconds = time.perf_counter() - start
        grown.save_pretrained(folder)
        return grown, self.done(f"{key}-cost", {"seconds": seconds, "threads": torch.get_num_threads(),
                                                "history": grown.history[-1]})


def run_add(n_new: int, name: str, add_config) -> dict:
    from megedit.living import AddConfig

    bench = Bench(name, n_new, add_config)
    main = WORK / "add.state.json"  # the default settings' run: a variant takes its pack's score and its refit
    measured = json.loads(main.read_text()) if name != "add" and main.exists() else {}
    if "before-old" in measured:  # the same pack, scored
        bench.done("before-old", measured["before-old"])
    old, new = bench.requests[:N_PACK], bench.requests[N_PACK:]
    pack = bench.pack()
    before = bench.score(pack, old, "before-old")
    grown, cost = bench.added(pack, new, f"pack-{N_PACK}+{n_new}{name.removeprefix('add')}")
    after_old, after_new = bench.score(grown, old, "after-old"), bench.score(grown, new, "after-new")
    grown.close()
    if name != "add":  # a variant of the add's settings: the refit is the default run's (bench/living.py add)
        refit_cost, refit_old, refit_new = (measured[k] for k in ("refit-cost", "refit-old", "refit-new"))
        refit_cost = {**refit_cost, "measured_by": "bench/living.py add (the default settings' run)"}
    else:
        refit_cost = bench.state.get("refit-cost") or bench.done("refit-cost", _refit(bench, old + new))
        refit = bench.load(WORK / f"refit-{len(old) + len(new)}")
        refit_old, refit_new = bench.score(refit, old, "refit-old"), bench.score(refit, new, "refit-new")
    return {"n_pack": N_PACK, "n_new": n_new, "add_config": dataclasses.asdict(add_config or AddConfig()),
            "before_old": before, "after_old": after_old, "after_new": after_new,
            "refit_old": refit_old, "refit_new": refit_new, "add": cost, "refit": refit_cost,
            "cost_ratio": cost["seconds"] / refit_cost["seconds"],
            "old_change": _change(before, after_old), "threads": _threads(cost, refit_cost)}


def _refit(bench: Bench, requests) -> dict:
    """All edits fitted again from scratch in a fresh work dir; the pack saved."""
    work = WORK / f"refit-{len(requests)}-work"
    if work.exists():  # a killed refit: start over, or its cached stages would make it look cheap
        shutil.rmtree(work)
    edited, seconds = bench.fit(requests, work)
    edited.save_pretrained(WORK / f"refit-{len(requests)}")
    edited.close()
    return {"seconds": seconds, "threads": torch.get_num_threads(), "timing": edited.record["timing"]}


def _change(before: dict, after: dict) -> dict:
    """After minus before, in points, for each metric and kind and the Score."""
    delta = {m: {k: after["metrics"][m][k] - v for k, v in kinds.items()} for m, kinds in before["metrics"].items()}
    return delta | {"score": after["score"] - before["score"]}


def run_successive(n_new: int, times: int) -> dict:
    bench = Bench("successive", n_new * times)
    old = bench.requests[:N_PACK]
    edited = bench.pack()
    steps = [{"added": 0, "n_edits": N_PACK, "old": bench.score(edited, old, "old-0")}]
    for k in range(1, times + 1):
        batch = bench.requests[N_PACK + n_new * (k - 1): N_PACK + n_new * k]
        edited, cost = bench.added(edited, batch, f"pack-{k}")
        steps.append({"added": k, "n_edits": N_PACK + n_new * k, "seconds": cost["seconds"],
                      "generator_steps": cost["history"]["generator"]["steps"],
                      "old": bench.score(edited, old, f"old-{k}"), "new": bench.score(edited, batch, f"new-{k}")})
    costs = [bench.state[f"pack-{k}-cost"] for k in range(1, times + 1)]
    return {"n_pack": N_PACK, "n_new": n_new, "times": times, "steps": steps, "threads": _threads(*costs)}


LIFELONG_SAVE = 25  # additions between two saved packs (a killed run resumes from the last)
LIFELONG_WINDOW = 100  # additions between two scorings of the edits added since


def run_lifelong(n_new: int) -> dict:
    """`n_new` edits added to the 1,024 pack one at a time, each timed and usable before the next; after every
    LIFELONG_WINDOW the edits added since are scored; at the end every edit is scored (no chats: the six-number
    Score), beside the same edits fitted in one batch (`lifelong-batch`, its own process)."""
    bench = Bench("lifelong", n_new)
    if bench.state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        raise SystemExit(f"living: the additions so far ran on {bench.state['threads']} threads; resume with as many")
    bench.done("threads", torch.get_num_threads())
    seconds, folder, done = bench.state.get("seconds", []), WORK / "lifelong-pack", bench.state.get("saved", 0)
    edited = bench.load(folder) if done else bench.pack()
    del seconds[done:]  # additions after the last saved pack are made again
    for t in range(done + 1, n_new + 1):
        edited = _add_one(bench, edited, t, seconds)
        if t % LIFELONG_WINDOW == 0:
            window = bench.requests[N_PACK + t - LIFELONG_WINDOW: N_PACK + t]
            bench.score(edited, window, f"window-{t}", chats=False)
        if t % LIFELONG_SAVE == 0 or t == n_new:
            _save_pack(edited, folder)
            bench.done("seconds", seconds)
            bench.done("saved", t)
    final = bench.score(edited, bench.requests, "all", chats=False, cases=True)
    edited.close()
    return _lifelong_result(bench, n_new, seconds, final)


def _add_one(bench: Bench, edited, t: int, seconds: list[float]):
    """`edited` with the t-th record after the pack added on its own (a fresh work dir), its wall time appended."""
    from megedit import add_edits

    work = WORK / f"{bench.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    edited = add_edits(edited, [bench.requests[N_PACK + t - 1]], work, pool=bench.pool, progress=False)
    seconds.append(time.perf_counter() - start)
    return edited


def _spread(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"median_s": ordered[len(ordered) // 2], "p90_s": ordered[int(0.9 * len(ordered))], "total_s": sum(seconds)}


def run_lifelong_timing(n_new: int) -> dict:
    """The first `n_new` single-edit additions of `lifelong` again, timed on this process's thread count
    and nothing else (no scoring, no saved packs): the cost of an addition on a machine to itself."""
    bench, seconds = Bench("lifelong-timing", n_new), []
    edited = bench.pack()
    load = os.getloadavg()[0]
    for t in range(1, n_new + 1):
        edited = _add_one(bench, edited, t, seconds)
    edited.close()
    return {"n_pack": N_PACK, "n_new": n_new, "seconds": seconds, **_spread(seconds),
            "threads": torch.get_num_threads(), "load_before": load, "load_after": os.getloadavg()[0]}


def _save_pack(edited, folder: Path) -> None:
    """The pack saved whole in place of the last one (written beside it, then swapped in)."""
    fresh, stale = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    for path in (fresh, stale):
        shutil.rmtree(path, ignore_errors=True)
    edited.save_pretrained(fresh)
    if folder.exists():
        folder.rename(stale)
    fresh.rename(folder)
    shutil.rmtree(stale, ignore_errors=True)


def run_lifelong_batch(n_new: int) -> dict:
    """The same 1,024 + `n_new` edits fitted in one batch (stages cached where bench/meg.py caches them) and
    scored as the lifelong pack is."""
    bench = Bench("lifelong-batch", n_new)
    if "all" not in bench.state:
        edited, seconds = bench.fit(bench.requests, CASES / "meg-counterfact")
        bench.done("fit", {"seconds": seconds, "threads": torch.get_num_threads(), "timing": edited.record["timing"]})
        bench.score(edited, bench.requests, "all", chats=False, cases=True)
        edited.close()
    return bench.state["all"]


def _lifelong_result(bench: Bench, n_new: int, seconds: list[float], final: dict) -> dict:
    """Per window of additions and for the old edits: the Score after all additions, and the batch fit's
    (once `lifelong-batch` has run)."""
    from megedit.eval import case_scores

    batch_state = WORK / "lifelong-batch.state.json"
    batch_run = json.loads(batch_state.read_text()) if batch_state.exists() else {}
    batch = batch_run.get("all")
    groups = {"old": bench.requests[:N_PACK], "added": bench.requests[N_PACK:]}
    groups |= {f"added {t - LIFELONG_WINDOW + 1}-{t}": bench.requests[N_PACK + t - LIFELONG_WINDOW: N_PACK + t]
               for t in range(LIFELONG_WINDOW, n_new + 1, LIFELONG_WINDOW)}

    def scored(report):
        return {name: case_scores(report["cases"], {r.case_id for r in rs}) for name, rs in groups.items()} | {
            "all": {k: report[k] for k in ("n", "metrics", "score")}}

    return {"n_pack": N_PACK, "n_new": n_new, "seconds": seconds, **_spread(seconds), "threads": bench.state["threads"],
            "windows": [{"added": t, **bench.state[f"window-{t}"]}
                        for t in range(LIFELONG_WINDOW, n_new + 1, LIFELONG_WINDOW)],
            "lifelong": scored(final), "batch": scored(batch) if batch else None,
            "batch_fit": batch_run.get("fit")}


def _threads(*costs: dict) -> int:
    """The thread count the timed steps ran with (as measured, not as this process resumes them)."""
    counts = {c["threads"] for c in costs}
    if len(counts) != 1:
        raise SystemExit(f"living: the timed steps ran with different thread counts {sorted(counts)}; time them again")
    return counts.pop()


def draw(result: dict, path: Path) -> Path:
    plt = pyplot()
    steps = result["steps"]
    x = [s["added"] for s in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for metric in ("reliability", "generality", "locality"):
        left.plot(x, [s["old"]["metrics"][metric]["ag"] for s in steps], marker="o", label=f"old {metric} AG")
    left.plot(x, [s["old"]["score"] for s in steps], marker="s", color="black", label="old Score")
    left.plot(x[1:], [s["new"]["metrics"]["reliability"]["ag"] for s in steps[1:]], marker="^", linestyle="--",
              label="batch just added: reliability AG")
    shown = [line.get_ydata() for line in left.get_lines()]
    left.set_ylim(max(0.0, min(min(y) for y in shown) - 5), 100.5)  # the changes are a few points: not 0-100
    for ax in (left, right):
        ax.set_xticks(x)
    left.set_xlabel(f"additions of {result['n_new']} edits")
    left.set_title(f"the first {result['n_pack']:,} edits after each addition", fontsize=10)
    left.legend(fontsize=7)
    right.bar(x[1:], [s["seconds"] for s in steps[1:]])
    right.set_xlabel("addition")
    right.set_title(f"wall time of each addition (s, {result['threads']} thread)", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, CounterFact, pack of the first 1,024 edits, seed 0 (megedit harness)",
                 fontsize=10)
    return save_png(fig, path)


def draw_lifelong(result: dict, path: Path) -> Path:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    seconds = result["seconds"]
    left.plot(range(1, len(seconds) + 1), seconds, linestyle="none", marker=".", markersize=2, alpha=0.5)
    left.axhline(result["median_s"], color="black", linewidth=1, label=f"median {result['median_s']:.2f} s")
    left.set_xlabel("addition t")
    left.set_title(f"wall time of each single-edit addition (s, {result['threads']} thread(s))", fontsize=10)
    left.legend(fontsize=8)
    windows = result["windows"]
    x = [w["added"] for w in windows]
    right.plot(x, [w["score"] for w in windows], marker="o", label="edits added in the last 100, right after")
    names = [f"added {t - LIFELONG_WINDOW + 1}-{t}" for t in x]
    right.plot(x, [result["lifelong"][n]["score"] for n in names], marker="s", label="the same, after all additions")
    if result["batch"]:
        right.plot(x, [result["batch"][n]["score"] for n in names], marker="^", linestyle="--",
                   label="the same, fitted in one batch")
    right.set_xlabel("addition t")
    right.set_title("Score (six numbers) of each window of 100 added edits", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M-Instruct, CounterFact: {result['n_new']:,} edits added one at a time to the pack of "
                 f"the first {result['n_pack']:,}, seed 0 (megedit harness)", fontsize=10)
    return save_png(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["add", "successive", "lifelong", "lifelong-batch", "lifelong-timing"])
    parser.add_argument("--new", type=int, default=None, help=(
        "edits per addition (add: 128, successive: 100); lifelong: single-edit additions (1,000)"))
    parser.add_argument("--times", type=int, default=10, help="successive: how many additions")
    parser.add_argument("--draw", action="store_true", help="successive: only draw the PNG from its result file")
    parser.add_argument("--passes", type=float, default=None, help="add: AddConfig.passes (a variant: its own files)")
    parser.add_argument("--replay", type=float, default=None, help="add: AddConfig.replay (a variant: its own files)")
    args = parser.parse_args()
    if args.draw:
        print(draw(payload(RESULTS / "living-successive.json"), RESULTS / "living-successive.png"))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megedit").setLevel(logging.INFO)
    from megedit.living import AddConfig

    WORK.mkdir(parents=True, exist_ok=True)
    name = args.bench
    if args.bench == "lifelong-batch":
        print(json.dumps({k: v for k, v in run_lifelong_batch(args.new or 1000).items() if k != "cases"}, indent=1))
        return 0
    if args.bench == "lifelong":
        result = run_lifelong(args.new or 1000)
    elif args.bench == "lifelong-timing":
        result = run_lifelong_timing(args.new or 100)
    elif args.bench == "add":
        changes = {k: v for k, v in (("passes", args.passes), ("replay", args.replay)) if v is not None}
        name += "".join(f"-{k}{v:g}" for k, v in changes.items())
        result = run_add(args.new or 128, name, AddConfig(**changes).validate())
    else:
        result = run_successive(args.new or 100, args.times)
    result |= {"model": "smollm2", "data": f"counterfact:{CF_EDIT.name}", "pool": f"counterfact:{CF_TRAIN.name}",
               "seed": 0, "protocol": "megedit-ag-tf-v1"}
    path = write_result(RESULTS / f"living-{name}.json", result, model="smollm2", n=result["n_pack"], seed=0,
                        method="meg, edits added to a pack", config=result.get("add_config"),
                        data={"edits": CF_EDIT, "pool": CF_TRAIN},
                        unknown={"method.config": "MeGConfig's and AddConfig's defaults of this revision"})
    if args.bench == "successive":
        draw(result, RESULTS / "living-successive.png")
    if args.bench == "lifelong":
        draw_lifelong(result, RESULTS / "living-lifelong.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "seconds")}, indent=1)[:3000])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
