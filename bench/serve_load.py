"""Load benchmark of `megedit serve`: concurrent clients send completions back to back, and we
measure requests/s, latency and completion tokens/s of the edited model against the same server
with the neuron off (the "-base" model id).

    .venv/bin/python bench/serve_load.py runs/cf1k/pack          # 32 clients, one minute per model
    .venv/bin/python bench/serve_load.py PACK --clients 4 --seconds 10 --rounds 1   # a quick check
    .venv/bin/python bench/serve_load.py PACK --data counterfact:PATH --out bench/results/x.json

The server is the real one (`megedit.serve.create_app` under uvicorn, on a free loopback port in
a background thread of this process), with its default --max-batch and --max-queue. The pack
loads as `megedit serve` loads it: on the base model its manifest names (the embedded SmolLM2 by
default), or --model, --device, --dtype.

Queries: for each edit the pack holds (its case ids, looked up in --data; for a pack that does not
list its edits, the first N records), its prompt, first rephrase and first locality prompt, shuffled
with a fixed seed, so some requests fire an edit and some do not. Every request is a non-streamed
POST /v1/completions with temperature 0 and --max-tokens; client k starts at its own offset in the
list and cycles through it.

Load: --clients clients (asyncio, the `openai` package's AsyncOpenAI, no retries), each sending its
next request as soon as the last one is answered. The edited and the base model are measured in
alternating rounds on the same server, --rounds rounds each; --seconds is the time per model, so
a round lasts --seconds / --rounds. Only requests that complete inside a round's window count; a
request still in flight when the window closes is waited for and not counted. So the run takes
2 x --seconds, plus each round's drain and a warm-up of one request per client per model (not
counted): with 32 clients on a CPU, each adds several seconds. Errors (a non-200 answer or an
exception) count wherever they happen, warm-up included. The clients share this process (and
its GIL) with the server: their cost is small next to generation.

Per model: requests completed, errors (and the first few messages), requests/s, latency p50/p95/
max (seconds, as the client sees it), completion tokens/s (the returned text re-tokenized with the
pack's tokenizer: the API has no `usage` field, and an answer's end token is not counted), the share
of requests that fired an edit (each choice's `megedit` object), and the server's mean rows per
batch (from /healthz). Then edited/base ratios of requests/s and tokens/s.
Results: bench/results/serve-load-<pack folder name>.json (or --out). Exit status 1 if any request
failed.

--workload mixed: short edited answers beside long base ones, the case continuous batching is for.
Each client alternates an edit's prompt on the edited model (--max-tokens; the answer is the new
target, then a newline) and a locality prompt on the base model (--long-tokens), for --seconds.
--compare-with DIR also runs the same load against another copy of the serve package (a folder
holding its __init__.py, app.py and batcher.py, e.g. the previous release's, written out with
`git show REV:src/megedit/serve/app.py`), one server after the other in this process; per server:
latency p50/p95 of each kind, requests/s, errors, and the process's resident memory (sampled
each second: at the start, the end and the peak of its run).

    .venv/bin/python bench/serve_load.py PACK --workload mixed --clients 8 --seconds 60 --compare-with /tmp/old-serve
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from result_schema import write_result

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = f"counterfact:{HERE.parents[1] / 'shared/data/counterfact/counterfact-edit.json'}"
MIX_SEED = 0
SHOWN_ERRORS = 5  # error messages kept per model; the count has them all
CLIENT_TIMEOUT_S = 600  # far above any sane latency: a timeout is an error, not a slow request


@dataclass
class Query:
    kind: str  # "prompt", "rephrase" or "locality"
    text: str


@dataclass
class Tally:
    """One model's requests over all its rounds."""

    latencies: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fired: list[tuple[str, bool]] = field(default_factory=list)  # (query kind, edit fired)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0  # measured window time
    batches: int = 0
    rows: int = 0


# -- the pack, the queries, the server ----------------------------------------------------------


def parse_args() -> argparse.Namespace:
    from megedit.cli.common import add_model_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pack", type=Path, help="edit pack folder")
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="KIND:PATH", help="the edit records of the pack")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per model, over all rounds")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per model (edited and base alternate)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--workload", choices=("alternate", "mixed"), default="alternate",
                        help="alternate: edited and base rounds; mixed: short edited and long base answers at once")
    parser.add_argument("--long-tokens", type=int, default=64, help="max_tokens of the mixed workload's base requests")
    parser.add_argument("--compare-with", type=Path, default=None, metavar="DIR",
                        help="mixed: also load another copy of the serve package (a folder with its __init__.py)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="mixed workload: this server's --max-batch (default: its own); a compared one keeps "
                             "its own")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/serve-load-<pack name>.json")
    add_model_args(parser, None, pack=True)  # --model, --device, --dtype, as `megedit serve`
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1 or args.seconds <= 0 or args.max_tokens < 1:
        parser.error("--clients, --rounds and --max-tokens must be at least 1, --seconds above 0")
    return args


def pack_edits(edited) -> tuple[list[str] | None, int]:
    """(the pack's case ids, or None for a pack that does not list them; how many edits it holds)."""
    if edited.edits is not None:
        return list(edited.edits.case_ids), len(edited.edits)
    return None, int(edited.record["n_edits"])  # such packs predate adding and removing edits


def query_mix(data: str, case_ids: list[str] | None, n_edits: int) -> list[Query]:
    """Each held edit's prompt, first rephrase and first locality prompt, shuffled with a fixed seed."""
    from megedit import load_requests
    from megedit.data import parse_data_arg

    kind, path = parse_data_arg(data)
    records = load_requests(kind, path, limit=None if case_ids else n_edits, skip_invalid=True)
    if case_ids is not None:
        wanted = set(case_ids)
        records = [r for r in records if r.case_id in wanted]
        if len(records) < len(wanted):
            logging.warning("serve_load: %d of the pack's %d edits are not in %s", len(wanted) - len(records),
                            len(wanted), data)
    if not records:
        sys.exit(f"serve_load: none of the pack's edits is in {data}")
    mix = []
    for r in records:
        mix.append(Query("prompt", r.prompt))
        mix += [Query("rephrase", r.rephrases[0])] if r.rephrases else []
        mix += [Query("locality", r.locality[0].prompt)] if r.locality else []
    random.Random(MIX_SEED).shuffle(mix)
    return mix


def server_counters(root: str) -> dict:
    with urllib.request.urlopen(f"{root}/healthz", timeout=30) as answer:
        return json.load(answer)


# -- the load -----------------------------------------------------------------------------------


async def ask(client, model: str, query: Query, max_tokens: int):
    """One completion: (latency in s, text, edit fired) or the error's message."""
    start = time.perf_counter()
    try:
        out = await client.completions.create(model=model, prompt=query.text, max_tokens=max_tokens, temperature=0)
    except Exception as error:  # any failure is a result to report, not a reason to stop
        cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
        return f"{type(error).__name__}: {error}{cause}"
    choice = out.choices[0]
    return time.perf_counter() - start, choice.text, bool((choice.megedit or {}).get("edit_fired"))


async def client_loop(client, model: str, mix: list[Query], offset: int, end: float, max_tokens: int,
                      tally: Tally) -> None:
    """Back-to-back requests until `end`; those answered after `end` are not counted."""
    i = offset
    while time.perf_counter() < end:
        query = mix[i % len(mix)]
        i += 1
        result = await ask(client, model, query, max_tokens)
        if isinstance(result, str):
            tally.errors.append(result)
        elif time.perf_counter() <= end:
            tally.latencies.append(result[0])
            tally.texts.append(result[1])
            tally.fired.append((query.kind, result[2]))


async def run_round(client, root: str, model: str, mix: list[Query], args, seconds: float, tally: Tally) -> None:
    before = server_counters(root)
    end = time.perf_counter() + seconds
    await asyncio.gather(*(client_loop(client, model, mix, k * len(mix) // args.clients, end, args.max_tokens, tally)
                           for k in range(args.clients)))
    after = server_counters(root)
    tally.seconds += seconds
    tally.batches += after["batches"] - before["batches"]
    tally.rows += after["rows"] - before["rows"]


async def warm_up(client, model: str, mix: list[Query], args, tally: Tally) -> None:
    """One request per client, not counted: the first calls pay one-time costs."""
    results = await asyncio.gather(*(ask(client, model, mix[k * len(mix) // args.clients], args.max_tokens)
                                     for k in range(args.clients)))
    tally.errors += [f"warm-up: {r}" for r in results if isinstance(r, str)]


async def measure(root: str, models: dict[str, str], mix: list[Query], args) -> dict[str, Tally]:
    """Warm up each model, then alternate rounds of edited and base."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    tallies = {name: Tally() for name in models}
    try:
        for name, model in models.items():
            await warm_up(client, model, mix, args, tallies[name])
        for r in range(args.rounds):
            for name, model in models.items():
                await run_round(client, root, model, mix, args, args.seconds / args.rounds, tallies[name])
                print(f"round {r + 1}/{args.rounds} {name}: {len(tallies[name].latencies)} requests so far", flush=True)
    finally:
        await client.close()
    return tallies


def model_ids(root: str) -> dict[str, str]:
    """{"edited": id, "base": id} from GET /v1/models."""
    with urllib.request.urlopen(f"{root}/v1/models", timeout=30) as answer:
        ids = [m["id"] for m in json.load(answer)["data"]]
    edited = next(i for i in ids if not i.endswith("-base"))
    return {"edited": edited, "base": f"{edited}-base"}


# -- the results --------------------------------------------------------------------------------


def summarize(tally: Tally, tokenizer) -> dict:
    """One model's numbers; tokens counted here, after the load, so the clients stay light."""
    n = len(tally.latencies)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in tally.texts)
    kinds = sorted({k for k, _ in tally.fired})
    return {"requests": n, "errors": len(tally.errors), "error_messages": tally.errors[:SHOWN_ERRORS],
            "seconds": tally.seconds, "requests_per_s": n / tally.seconds,
            "latency_s": latency(np.array(tally.latencies)),
            "completion_tokens": tokens, "tokens_per_s": tokens / tally.seconds,
            "edit_fired_share": sum(f for _, f in tally.fired) / max(1, n),
            "edit_fired_share_by_kind": {k: float(np.mean([f for q, f in tally.fired if q == k])) for k in kinds},
            "server_batches": tally.batches, "rows_per_batch": tally.rows / max(1, tally.batches)}


def latency(seconds: np.ndarray) -> dict:
    if not len(seconds):  # nothing completed: no numbers rather than NaN, which JSON lacks
        return dict.fromkeys(("p50", "p95", "max", "mean"))
    return {"p50": float(np.percentile(seconds, 50)), "p95": float(np.percentile(seconds, 95)),
            "max": float(seconds.max()), "mean": float(seconds.mean())}


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def report(edited, args, mix: list[Query], n_edits: int, batcher, models: dict, tallies: dict) -> dict:
    per_model = {name: summarize(t, edited.tokenizer) for name, t in tallies.items()}
    e, b = per_model["edited"], per_model["base"]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "workload": "alternate",
            "pack": str(args.pack.resolve()), "n_edits": n_edits, "data": args.data, "n_queries": len(mix),
            "query_kinds": {k: sum(q.kind == k for q in mix) for k in ("prompt", "rephrase", "locality")},
            "model_ids": models, "device": str(edited.model.device), "dtype": str(edited.model.dtype),
            "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
            "round_seconds": args.seconds / args.rounds, "max_tokens": args.max_tokens,
            "max_batch": batcher.max_batch, "max_queue": batcher.max_queue,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **per_model,
            "ratio": {"requests_per_s": ratio(e["requests_per_s"], b["requests_per_s"]),
                      "tokens_per_s": ratio(e["tokens_per_s"], b["tokens_per_s"])}}


def show(result: dict) -> None:
    print(f"{result['clients']} clients, {result['seconds']:g} s per model in {result['rounds']} round(s), "
          f"{result['n_queries']} queries from {result['n_edits']} edits, max_tokens {result['max_tokens']}, "
          f"{result['threads']} torch thread(s) on {result['device']}")
    for name in ("edited", "base"):
        m = result[name]
        lat = {k: "n/a" if v is None else f"{v:.3f} s" for k, v in m["latency_s"].items()}
        print(f"  {name:6} {m['requests_per_s']:7.2f} req/s  {m['tokens_per_s']:7.1f} tok/s  p50 {lat['p50']}  "
              f"p95 {lat['p95']}  max {lat['max']}  {m['requests']} requests, {m['errors']} errors, "
              f"edit fired {100 * m['edit_fired_share']:.0f}%, {m['rows_per_batch']:.1f} rows/batch")
    r = result["ratio"]
    print(f"  edited/base: requests/s {_two(r['requests_per_s'])}, tokens/s {_two(r['tokens_per_s'])}")


def _two(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


# -- the mixed workload ---------------------------------------------------------------------------


def serve_package(folder: Path | None):
    """megedit.serve, or another copy of it loaded from `folder` as megedit.serve_other (its
    relative imports then reach this megedit's other modules)."""
    if folder is None:
        import megedit.serve as package

        return package
    spec = importlib.util.spec_from_file_location("megedit.serve_other", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["megedit.serve_other"] = package
    spec.loader.exec_module(package)
    return package


class Memory:
    """The process's resident memory, sampled every second in a thread: start, end, peak and one
    sample a minute (MiB), so growth over a long run shows."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(self.now())

    def __enter__(self) -> "Memory":
        self.samples.append(self.now())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.now())

    def summary(self) -> dict:
        return {"start_mib": round(self.samples[0], 1), "end_mib": round(self.samples[-1], 1),
                "peak_mib": round(max(self.samples), 1), "per_minute_mib": [round(x, 1) for x in self.samples[::60]]}


async def mixed_load(root: str, models: dict[str, str], mix: list[Query], args) -> dict[str, Tally]:
    """Clients alternate short edited requests (edit prompts) and long base ones (locality prompts)."""
    from openai import AsyncOpenAI

    kinds = {"short": (models["edited"], [q for q in mix if q.kind == "prompt"], args.max_tokens),
             "long": (models["base"], [q for q in mix if q.kind == "locality"] or mix, args.long_tokens)}
    tallies = {kind: Tally() for kind in kinds}
    client = AsyncOpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)

    async def one_client(k: int, end: float, count: bool) -> None:
        i = k
        while time.perf_counter() < end:
            kind = ("short", "long")[i % 2]
            model, queries, max_tokens = kinds[kind]
            result = await ask(client, model, queries[(i // 2) % len(queries)], max_tokens)
            i += 1
            if isinstance(result, str):
                tallies[kind].errors.append(result)
            elif count and time.perf_counter() <= end:
                tallies[kind].latencies.append(result[0])
                tallies[kind].texts.append(result[1])
                tallies[kind].fired.append((kind, result[2]))
            if not count:
                return

    try:
        await asyncio.gather(*(one_client(k, time.perf_counter() + 1e9, False) for k in range(args.clients)))
        before = server_counters(root)
        await asyncio.gather(*(one_client(k, time.perf_counter() + args.seconds, True) for k in range(args.clients)))
        after = server_counters(root)
    finally:
        await client.close()
    for tally in tallies.values():
        tally.seconds = args.seconds
        tally.batches, tally.rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    return tallies


def run_mixed(edited, args, mix: list[Query], n_edits: int) -> dict:
    """The mixed workload against this server and, with --compare-with, the other one."""
    servers = {"continuous": serve_package(None)}
    if args.compare_with is not None:
        servers["compared"] = serve_package(args.compare_with)
    results = {}
    for name, package in servers.items():
        limits = {"max_batch": args.max_batch} if args.max_batch and name == "continuous" else {}  # else its default
        app = package.create_app(edited, model_id=f"megedit/{args.pack.resolve().name}", **limits)
        with Memory() as memory, package.in_thread(app) as root:
            tallies = asyncio.run(mixed_load(root, model_ids(root), mix, args))
        n = sum(len(t.latencies) for t in tallies.values())
        results[name] = {"package": package.__file__, "requests": n, "requests_per_s": n / args.seconds,
                         "errors": sum(len(t.errors) for t in tallies.values()),
                         "latency_s": latency(np.array([x for t in tallies.values() for x in t.latencies])),
                         "memory": memory.summary(), "server": server_stats(app),
                         **{kind: summarize(t, edited.tokenizer) for kind, t in tallies.items()}}
        print(f"{name}: {results[name]['requests_per_s']:.2f} req/s", flush=True)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "workload": "mixed",
            "pack": str(args.pack.resolve()), "n_edits": n_edits, "data": args.data, "clients": args.clients,
            "seconds": args.seconds, "max_tokens_short": args.max_tokens, "max_tokens_long": args.long_tokens,
            "compared_with": None if args.compare_with is None else str(args.compare_with.resolve()),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(edited.model.device),
            "dtype": str(edited.model.dtype), **results}


def server_stats(app) -> dict:
    batcher = app.state.batcher
    return {"max_batch": batcher.max_batch, "max_batch_tokens": getattr(batcher, "max_batch_tokens", None),
            "max_queue": batcher.max_queue, **batcher.stats}


def show_mixed(result: dict) -> None:
    print(f"mixed workload: {result['clients']} clients, {result['seconds']:g} s, short max_tokens "
          f"{result['max_tokens_short']} (edited), long {result['max_tokens_long']} (base), "
          f"{result['threads']} thread(s)")
    for name in ("continuous", "compared"):
        if name not in result:
            continue
        m = result[name]
        memory = m["memory"]
        print(f"  {name:10} {m['requests_per_s']:6.2f} req/s  {m['errors']} errors  memory peak "
              f"{memory['peak_mib']:.0f} MiB (start {memory['start_mib']:.0f}, end {memory['end_mib']:.0f})")
        for kind in ("short", "long"):
            lat = m[kind]["latency_s"]
            print(f"    {kind:5} {m[kind]['requests']:4} requests  p50 {_secs(lat['p50'])}  p95 {_secs(lat['p95'])}")


def _secs(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} s"


def provenance(edited, args, n_edits: int) -> dict:
    """The result's provenance beyond what the writer finds itself: the pack's base model and edits."""
    return {"model": getattr(edited.model, "megedit_source", None) or edited.model.config.name_or_path,
            "fingerprint": edited.fingerprint, "n": n_edits, "seed": MIX_SEED, "method": "meg (a saved pack, served)",
            "config": edited.config or None, "data": {"edits": args.data.split(":", 1)[-1]},
            "unknown": {"method.config": "the pack records no config"}}


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from megedit.cli.common import load_pack
    from megedit.serve import create_app, in_thread

    edited = load_pack(args)
    case_ids, n_edits = pack_edits(edited)
    mix = query_mix(args.data, case_ids, n_edits)
    if args.workload == "mixed":
        result = run_mixed(edited, args, mix, n_edits)
        out = args.out or HERE / "results" / f"serve-load-mixed-{args.pack.resolve().name}.json"
        write_result(out, result, **provenance(edited, args, n_edits))
        show_mixed(result)
        print(f"wrote {out}")
        return 1 if any(result[name]["errors"] for name in ("continuous", "compared") if name in result) else 0
    app = create_app(edited, model_id=f"megedit/{args.pack.resolve().name}")  # the server's default limits
    with in_thread(app) as root:
        models = model_ids(root)
        tallies = asyncio.run(measure(root, models, mix, args))
    result = report(edited, args, mix, n_edits, app.state.batcher, models, tallies)
    out = args.out or HERE / "results" / f"serve-load-{args.pack.resolve().name}.json"
    write_result(out, result, **provenance(edited, args, n_edits))
    show(result)
    print(f"wrote {out}")
    failed = [m for name in ("edited", "base") for m in result[name]["error_messages"]]
    if failed:
        print(f"{result['edited']['errors'] + result['base']['errors']} request(s) failed; first: {failed[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
