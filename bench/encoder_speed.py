"""The sentence encoder's two costs in a fit, timed at two revisions side by side: stage B's training
(one epoch of InfoNCE with hard negatives on the first --pool records of counterfact-train.json)
and encoding (stage C's router negatives for the first --edits records of counterfact-edit.json).

    OMP_NUM_THREADS=2 .venv/bin/python bench/encoder_speed.py [--before REV] [--after REV] [--rounds 2]

Each revision runs in its own process (its exported src first on PYTHONPATH), the two taking turns
for --rounds rounds; the table gives each one's best time and the ratio. The embeddings of the two
are compared too (largest absolute difference): a change in speed should leave them as they were.

Result: bench/results/encoder-speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from result_schema import write_result
from same_results import SHARED, export, short_revision

HERE = Path(__file__).resolve().parent
# run under each revision: prints the timings and writes the embeddings to argv[1]
PROBE = """
import json, sys, time, torch
from megedit import MeGConfig, load_requests
from megedit.models import load_encoder
from megedit.stages.encoder import train_encoder, training_triples
from megedit.stages.routing import edit_negatives
out, edits_path, pool_path, n_pool, n_edits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
config = MeGConfig().routing
config.encoder.epochs = 1
pool = load_requests("counterfact", pool_path)
edits = load_requests("counterfact", edits_path, limit=n_edits)
texts = edit_negatives(edits, pool, config)[0]
encoder = load_encoder("minilm", device="cpu")
start = time.perf_counter()
embedded = encoder.encode(texts)
encode_s = time.perf_counter() - start
queries, paraphrases, negatives = training_triples(pool[:n_pool], config.encoder)
start = time.perf_counter()
tuned, _ = train_encoder(encoder, queries, paraphrases, config.encoder, progress=False, negatives=negatives)
train_s = time.perf_counter() - start
torch.save({"negatives": embedded, "tuned": tuned.encode(texts[:2048])}, out)
print(json.dumps({"encode_s": encode_s, "sentences": len(texts), "train_s": train_s, "pairs": len(queries),
                  "threads": torch.get_num_threads()}))
"""


def probe(src: Path, out: Path, pool: int, edits: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [str(out), str(SHARED / "counterfact-edit.json"), str(SHARED / "counterfact-train.json"), str(pool),
            str(edits)]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"probe at {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="HEAD", help="a revision (default: the last commit)")
    parser.add_argument("--after", default=None, help="a revision; default: this working tree")
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.before, args.after = (short_revision(r) for r in (args.before, args.after))
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="encoder-speed-") as tmp:
        tmp = Path(tmp)
        (tmp / "before").mkdir(), (tmp / "after").mkdir()
        srcs = {"before": export(args.before, tmp / "before"), "after": export(args.after, tmp / "after")}
        for _ in range(args.rounds):
            for name, src in srcs.items():
                runs[name].append(probe(src, tmp / f"{name}.pt", args.pool, args.edits))
                print(name, json.dumps(runs[name][-1]), flush=True)
        before, after = (torch.load(tmp / f"{name}.pt") for name in ("before", "after"))
    best = {name: {k: min(r[k] for r in rows) for k in ("encode_s", "train_s")} for name, rows in runs.items()}
    result = {"before": args.before, "after": args.after or "working tree", "pool": args.pool, "edits": args.edits,
              "sentences": runs["after"][0]["sentences"], "pairs": runs["after"][0]["pairs"], "runs": runs,
              "best": best, "speedup": {k: best["before"][k] / best["after"][k] for k in ("encode_s", "train_s")},
              "max_abs_difference": {k: float((before[k] - after[k]).abs().max()) for k in before}}
    print(json.dumps({k: result[k] for k in ("best", "speedup", "max_abs_difference")}, indent=1))
    write_result(HERE / "results" / "encoder-speed.json", result, model="minilm", n=args.edits, seed=0, method="meg",
                 config=None, threads=runs["after"][0]["threads"],
                 data={"edits": SHARED / "counterfact-edit.json", "pool": SHARED / "counterfact-train.json"},
                 unknown={"method.config": "MeGConfig's routing defaults, one encoder epoch"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
