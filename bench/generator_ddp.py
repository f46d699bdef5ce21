"""Data-parallel generator training on this CPU: one process on 2 threads against
`accelerate launch --num_processes 2` on 1 thread each, same global batch, same steps.

    .venv/bin/python bench/generator_ddp.py                  # MeG's MLP generator at its default shapes
    .venv/bin/python bench/generator_ddp.py --steps 600 --rounds 3

The pairs are random, at the shapes of a real run (4.8 wordings per edit, 384-d conditions,
SmolLM2's 1,152-d neuron vectors): speed depends only on the shapes, and tests/test_generator.py
checks that the processes stay in step and learn. The rate is taken between the two validations
(halfway and at the end), so process start-up and the first steps are left out. Rounds alternate
the two setups (the machine is shared); results go to bench/results/generator_ddp.json.
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
RESULT = HERE / "results" / "generator_ddp.json"
LENGTH, COND, WORDINGS = 1152, 384, 4.8  # SmolLM2's neuron vector, MiniLM's embedding, wordings per edit


def worker(out: Path, edits: int, steps: int, width: int) -> None:
    """Train on random pairs; the main process writes its step rate (steps/s between validations)."""
    import torch
    from accelerate import PartialState

    from megedit.stages.generator import GeneratorConfig, train_generator

    g = torch.Generator().manual_seed(0)
    pairs = int(edits * WORDINGS)
    cond = torch.nn.functional.normalize(torch.randn(pairs, COND, generator=g), dim=-1)
    vectors = torch.randn(pairs, LENGTH, generator=g)
    config = GeneratorConfig(kind="mlp", mlp={"hidden": width}, train_steps=steps, passes=None,
                             validate_every=steps // 2)
    generator = train_generator(cond, vectors, config, progress=False, n_edits=edits)
    if PartialState().is_main_process:
        (first, last) = generator.record["history"][:2]
        rate = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
        out.write_text(json.dumps({"steps_per_s": rate, "processes": generator.record["processes"],
                                   "threads": torch.get_num_threads(), "parameters": generator.record["parameters"]}))


def run(setup: str, args) -> dict:
    """One timed training in a fresh process (or two), as `setup` says."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rate.json"
        own = [str(Path(__file__)), "--worker", str(out), "--edits", str(args.edits), "--steps", str(args.steps),
               "--width", str(args.width)]
        if setup == "1 process x 2 threads":
            command, threads = [sys.executable, *own], "2"
        else:
            command, threads = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                *own], "1"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{setup} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=1024, help="the MLP generator's hidden width (MeG's default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.edits, args.steps, args.width)
        return 0
    setups = ("1 process x 2 threads", "2 processes x 1 thread (accelerate launch)")
    rates: dict[str, list[float]] = {s: [] for s in setups}
    for round_ in range(args.rounds):
        for setup in setups if round_ % 2 == 0 else setups[::-1]:
            rates[setup].append(run(setup, args)["steps_per_s"])
            print(f"round {round_ + 1}: {setup}: {rates[setup][-1]:.1f} steps/s", flush=True)
    best = {s: max(r) for s, r in rates.items()}
    summary = {"generator": "mlp", "width": args.width, "edits": args.edits, "pairs": int(args.edits * WORDINGS),
               "batch_size": 128, "steps": args.steps, "rounds": args.rounds, "rates": rates, "best": best,
               "speedup": best[setups[1]] / best[setups[0]], "cpu_count": os.cpu_count(),
               "measured": time.strftime("%Y-%m-%d")}
    write_result(RESULT, summary, model=None, n=args.edits, seed=0, method="meg stage D (generator)",
                 config={"kind": "mlp", "mlp": {"hidden": args.width}, "train_steps": args.steps,
                         "validate_every": args.steps // 2},  # over GeneratorConfig's defaults, as the worker sets them
                 threads=None, unknown={"model.name": "no language model: random condition -> vector pairs",
                                        "threads": "each setup's own (1 process x 2, 2 processes x 1)"})
    print(f"2 processes / 1 process: {summary['speedup']:.2f}x (best of {args.rounds}) -> {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
