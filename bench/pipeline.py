"""The whole job a user runs, timed: `megedit fit` then `megedit eval` of the first 1,024
CounterFact edits (pool counterfact-train.json, defaults, seed 0, SmolLM2) from an empty work
dir and an empty cache (the converted base model aside, a set-up step), each command in a process
of its own, as a user types them. Run it with nothing else on the machine: the machine's load
average before and after is recorded beside the thread count so a contended run shows as one.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline.py          # -> bench/results/pipeline-cf-1024.json
    .venv/bin/python bench/pipeline.py --limit 128                  # a quick look (-> pipeline-cf-128.json)
    .venv/bin/python bench/pipeline.py --processes 2                # stage A and the eval in 2 one-thread processes
                                                                    # (-> pipeline-cf-1024-processes2.json)
    .venv/bin/python bench/pipeline.py --limit 10000 --swap --processes 2   # the files' roles swapped: edits from
                                                                    # counterfact-train.json, pool counterfact-edit.json
    ... --resume                                                    # go on with a killed run's work dir (marked so)

The fit's own record (the pack's pack.json) gives each stage's time and the generator kind; the eval JSON gives the
metrics, so the run doubles as a check that the CLI reproduces bench/meg.py's numbers.
bench/update_readme.py shows the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from result_schema import write_result

from megedit.io import atomic_write_json

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"
CF_EDIT, CF_TRAIN = SHARED / "counterfact-edit.json", SHARED / "counterfact-train.json"
MEGEDIT = Path(sys.executable).with_name("megedit")


def timed(args: list[str], cache: Path) -> float:
    """Wall seconds of one megedit command with its cache at `cache` (its output shown; a failure stops the bench)."""
    start = time.perf_counter()
    subprocess.run([str(MEGEDIT), *args, "--quiet"], check=True, env={**os.environ, "MEGEDIT_CACHE": str(cache)})
    return time.perf_counter() - start


def fresh_cache(work: Path) -> Path:
    """An empty megedit cache in `work`, holding only the converted base models (set-up work, not the job's): the
    eval then computes the unedited model's reference answers as on a fresh machine."""
    from megedit.models import cache_root

    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if (cache_root() / "models").exists() and not (cache / "models").exists():
        (cache / "models").symlink_to(cache_root() / "models")
    return cache


def machine_speed(threads: int) -> dict:
    """This machine's CPU and how fast it runs SmolLM2 before the job: one forward of 16 x 32 tokens (the median of
    5, after a warm-up) at the job's thread count. The machines this project runs on differ in CPU from session to
    session: runs on different ones are compared through this figure."""
    import torch

    from megedit import load_model

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), None)
    torch.set_num_threads(threads)
    model, _ = load_model("smollm2")
    ids = torch.randint(100, 10000, (16, 32), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(6):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return {"cpu": name, "avx512": " avx512f" in cpu, "forward_16x32_s": round(sorted(times[1:])[2], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=1, help="megedit fit / eval --processes")
    parser.add_argument("--swap", action="store_true", help="edits from counterfact-train.json, pool counterfact-edit.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep a killed run's work dir and go on: a command it finished is not run again and keeps "
                             "its time (work/times.json); the result is marked resumed, since a command killed half way "
                             "counts only its resumed part")
    args = parser.parse_args()

    edits, pool = (CF_TRAIN, CF_EDIT) if args.swap else (CF_EDIT, CF_TRAIN)
    name = ("swap-" if args.swap else "") + f"{args.limit}" + (f"-processes{args.processes}" if args.processes > 1 else "")
    work = HERE / "results" / "cases" / f"pipeline-{name}"
    if work.exists() and not args.resume:  # from an empty work dir: nothing cached
        shutil.rmtree(work)
    data = ["--data", f"counterfact:{edits}", "--limit", str(args.limit)]
    cache = fresh_cache(work)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    machine = machine_speed(threads)
    load_before = os.getloadavg()
    fit = job_step("fit", ["fit", *data, "--pseudo", f"counterfact:{pool}", "--out", str(work / "pack"),
                           "--work-dir", str(work / "work"), "--processes", str(args.processes)], cache, work)
    probes = specificity_pool(edits, args.limit, pool)
    evaluation = job_step("eval", ["eval", str(work / "pack"), *data, "--json", str(work / "eval.json"),
                                   "--processes", str(args.processes), *probes], cache, work)
    fit_s, eval_s = fit["seconds"], evaluation["seconds"]
    report = json.loads((work / "eval.json").read_text())
    references = {k.removesuffix("_reference_s"): v for k, v in report["timing"].items() if k.endswith("_reference_s")}
    manifest = json.loads((work / "pack" / "pack.json").read_text())
    result = {"command": f"megedit fit {' '.join(data)} --pseudo counterfact:{pool.name} --processes {args.processes}; "
                         f"megedit eval PACK {' '.join(data)} --processes {args.processes}",
              "n": args.limit, "data": f"counterfact:{edits.name}", "pool": f"counterfact:{pool.name}",
              "model": "smollm2", "seed": 0, "resumed": args.resume,
              "times_from": {"fit": fit["source"], "eval": evaluation["source"]},
              "specificity_pool": probes[1] if probes else "the records of the edit file after the edited ones",
              # the unedited model's answers the eval compares with, computed once per model and queries (the run's
              # cache starts empty), then read from the cache: their share of eval_s
              "references_s": references, "reference_s": sum(references.values()),
              "threads": threads, "processes": args.processes, "machine": machine,
              "load_before": load_before[0], "load_after": os.getloadavg()[0], "cpus": os.cpu_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "generator": manifest["config"]["generator"]["kind"],
              "fit_s": fit_s, "eval_s": eval_s, "total_s": fit_s + eval_s, "stages": _stages(manifest),
              "metrics": report["metrics"], "score": report["score"], "parts": parts(manifest, report)}
    path = write_result(HERE / "results" / f"pipeline-cf-{name}.json", result, model="smollm2",
                        fingerprint=manifest["base_model"]["fingerprint"], n=args.limit, seed=0, method="meg",
                        config=manifest["config"], threads=result["threads"], data={"edits": edits, "pool": pool},
                        timings={"fit_s": fit_s, "eval_s": eval_s})
    print(f"fit {fit_s:.0f} s + eval {eval_s:.0f} s = {(fit_s + eval_s) / 60:.1f} min "
          f"({result['threads']} threads, {args.processes} process(es) for stage A and eval; load {load_before[0]:.1f} before); Score {report['score']:.1f}; wrote {path}")
    return 0


def job_step(step: str, args: list[str], cache: Path, work: Path) -> dict:
    """{"seconds", "source"} of one command of the job, run and timed; its time is kept in the work dir's times.json
    as soon as it finishes, so that a resumed job does not run it again. A fit whose pack was written by a run
    that kept no times takes the pack's own record of the fit."""
    path = work / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    pack = work / "pack" / "pack.json"
    if step == "fit" and step not in times and pack.exists():
        times[step] = {"seconds": json.loads(pack.read_text())["record"]["timing"]["total_s"],
                       "source": "the pack's record: stages A-D and their preparation, without the process's start-up "
                                 "(loading the model) and the pack's writing"}
    elif step not in times:
        times[step] = {"seconds": timed(args, cache), "source": "the command's wall time"}
    atomic_write_json(path, times)
    return times[step]


def specificity_pool(edits: Path, limit: int, pool: Path) -> list[str]:
    """The eval's specificity probes come from the records of the edit file after the edited ones (megedit eval's
    default); when none follow, from the fit's pool file, as bench/meg.py takes them."""
    from megedit.data import count_records

    return [] if count_records("counterfact", edits) > limit else ["--specificity-pool", f"counterfact:{pool}"]


def parts(manifest: dict, report: dict) -> dict:
    """Finer times of the job (seconds) and stage A's work, from the pack's fit record and the eval report."""
    record, timing = manifest["record"], report["timing"]
    fit = record["fit"]["timing"]
    known = fit.get("forked_edits", 0) == 0  # stage A's counters stay in forked processes: not known here
    stage_a = {"hidden_cache_s": "hidden_cache_s", "steps_s": "fit_s", "trained_rows": "trained_rows",
               "trained_tokens": "trained_tokens"}
    return {**{name: fit[key] if known else None for name, key in stage_a.items()},
            "encoder_s": record["timing"]["BC"]["encoder"]["seconds"],
            "router_s": record["timing"]["BC"]["router_s"], "chat_reference_s": timing.get("chat_reference_s"),
            "chat_s": timing.get("chat_s")}


def _stages(manifest: dict) -> dict:
    """Each stage's seconds from the fit record in the pack's pack.json."""
    timing = manifest["record"]["timing"]
    return {stage: round(t["seconds"], 1) for stage, t in timing.items() if isinstance(t, dict) and "seconds" in t}


if __name__ == "__main__":
    sys.exit(main())
