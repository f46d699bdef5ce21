"""Stage A and the fitted vectors' evaluation under torchrun: 1 rank against 2, on this machine, as a
user runs them: `megedit fit-neurons --pseudo ... --eval` (the wordings `megedit fit` builds, pool
counterfact-train.json, defaults, seed 0, SmolLM2), each arm from an empty work dir and cache.

    .venv/bin/python bench/ranks.py --limit 1024 [--arms 1x2,2x1]   # -> bench/results/ranks-cf-1024.json

Arms, one after the other: 1 rank on 1 thread, 1 rank on 2 threads, 2 ranks on 1 thread each
(torchrun's own setting). The first and the last must give the same vectors to the bit (the same
thread count per process); the speed-ups compare the last with the other two. Run it with nothing
else on the machine: the load average before each arm is recorded. bench/update_readme.py shows it
(docs/results.md, table ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from result_schema import write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared/data/counterfact"
CF_EDIT, CF_TRAIN = SHARED / "counterfact-edit.json", SHARED / "counterfact-train.json"
ARMS = ((1, 1), (1, 2), (2, 1))  # (ranks, threads each)


def arm(ranks: int, threads: int, limit: int, scratch: Path) -> dict:
    """One torchrun of `megedit fit-neurons --eval`, timed; its vectors and fitted-vector scores."""
    from safetensors.torch import load_file

    out = scratch / f"ranks{ranks}-threads{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MEGEDIT_CACHE": str(out / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "megedit.cli", "fit-neurons", "--data", f"counterfact:{CF_EDIT}", "--limit", str(limit),
               "--pseudo", f"counterfact:{CF_TRAIN}", "--work-dir", str(out / "work"),
               "--out", str(out / "vectors.safetensors"), "--eval", "--quiet"]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - start
    fitted = json.loads((out / "vectors.json").read_text())
    report = json.loads((out / "vectors.eval.json").read_text())
    vectors = load_file(out / "vectors.safetensors")["vectors"]
    print(f"{ranks} rank(s) x {threads} thread(s): {seconds:.0f} s, stage A {fitted['timing']['total_s']:.0f} s")
    return {"ranks": ranks, "threads_each": threads, "load_before": load_before, "seconds": seconds,
            "stage_a_s": fitted["timing"]["total_s"], "eval_s": report["timing"]["total_s"],
            "success_rate": fitted["success_rate"], "metrics": report["metrics"], "vectors": vectors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--arms", default=",".join(f"{r}x{t}" for r, t in ARMS),
                        help="RANKSxTHREADS, comma-separated (default: all three; 2x1 is always run)")
    args = parser.parse_args()
    chosen = [tuple(int(x) for x in a.split("x")) for a in args.arms.split(",")]
    chosen = [a for a in ARMS if a in chosen or a == (2, 1)]
    with tempfile.TemporaryDirectory(prefix="megedit-ranks-") as scratch:
        arms = {(r, t): arm(r, t, args.limit, Path(scratch)) for r, t in chosen}
    vectors = {key: a.pop("vectors") for key, a in arms.items()}
    two_ranks = arms[(2, 1)]
    result = {"n": args.limit, "data": f"counterfact:{CF_EDIT.name}", "pool": f"counterfact:{CF_TRAIN.name}",
              "model": "smollm2", "seed": 0, "cpus": os.cpu_count(), "arms": list(arms.values())}
    if (1, 1) in arms:  # the same thread count per process: the same vectors and scores, to the bit
        result |= {"same_vectors_as_one_rank_one_thread": bool((vectors[(1, 1)] == vectors[(2, 1)]).all()),
                   "same_metrics_as_one_rank_one_thread": arms[(1, 1)]["metrics"] == two_ranks["metrics"],
                   "speedup_vs_one_thread": arms[(1, 1)]["seconds"] / two_ranks["seconds"]}
    if (1, 2) in arms:
        result |= {"max_vector_difference_two_threads": float((vectors[(1, 2)] - vectors[(2, 1)]).abs().max()),
                   "speedup_vs_two_threads": arms[(1, 2)]["seconds"] / two_ranks["seconds"]}
    path = write_result(HERE / "results" / f"ranks-cf-{args.limit}.json", result, model="smollm2", fingerprint=None,
                        n=args.limit, seed=0, method="meg stage A", config=None,
                        data={"edits": CF_EDIT, "pool": CF_TRAIN}, threads=None,
                        unknown={"method.config": "fit-neurons' defaults of this revision",
                                 "model.fingerprint": "each arm loads the model in its own processes",
                                 "threads": "per arm, in arms[].threads_each"})
    print(f"wrote {path}: " + json.dumps({k: v for k, v in result.items() if k != "arms"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
