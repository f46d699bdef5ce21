"""Wrap every result file of before the schema (bench/result_schema.py) into it, in place.

Re-runnable and idempotent. An old file becomes the schema's "result" payload (so every table
reads the same numbers); what its payload recorded (model, n, seed, method, config, threads, data
names, date) is copied up into the envelope, and every other provenance field is null with its
reason under "unknown": nothing is guessed. Then, in old and wrapped files alike, each payload key
that its bench script writes today but its runs of before did not is filled (FILLS): with what
those runs did, the value the table writer assumed for them, or null; each under "unknown" as
"result.<key>", saying so. The table writer reads these keys plainly. Run it after any bench
script of before the schema wrote a file:

    PYTHONPATH=src .venv/bin/python bench/migrate_results.py [FILE ...]   (default: bench/results/*.json)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from result_schema import FIELDS, PACKAGES, RESULTS, SCHEMA, check, is_record  # noqa: E402 (bench/ is this folder)

NOT_RECORDED = "not recorded by the bench script of before the schema"
NOT_WRITTEN = "not written by the bench script of then"  # a payload key filled in (FILLS)
# file-name prefix -> the script that writes such files (longest prefixes first: baseline_sweep before baseline)
SCRIPTS = (("baseline_sweep-", "baseline_sweep"), ("baseline-", "baselines"), ("causal_trace", "causal_trace"),
           ("denoising-profile-", "generator"), ("epsilon_whatif-", "epsilon_whatif"),
           ("fit_neurons-", "fit_neurons"), ("generality-levers-", "generality"), ("stage-a-cost-", "generality"),
           ("generator_ddp", "generator_ddp"), ("generator-", "generator"), ("living-", "living"),
           ("meg-", "meg"), ("own-facts-", "own_facts"), ("pipeline-", "pipeline"), ("processes-", "processes"),
           ("real-use-levers", "real_use_levers"), ("router_ceiling", "router_ceiling"),
           ("router_kinds-", "router_kinds"), ("routing-", "routing"), ("scale_curve", "scale_curve"),
           ("serve-load-", "serve_load"))
# payload keys naming a data file ("counterfact:counterfact-edit.json" or a bare file name), by role
DATA_KEYS = {"edits": ("data", "edits"), "pool": ("pool",)}
N_KEYS = ("n", "n_edits", "n_pack", "n_facts")  # the first integer of these is the result's N
THREAD_KEYS = ("threads", "torch_threads")
HEX = set("0123456789abcdef")


def script_of(name: str) -> str | None:
    return next((f"bench/{script}.py" for prefix, script in SCRIPTS if name.startswith(prefix)), None)


def _first_int(old: dict, keys: tuple[str, ...]) -> int | None:
    return next((old[k] for k in keys if isinstance(old.get(k), int) and not isinstance(old[k], bool)), None)


def _data(old: dict, unknown: dict[str, str]) -> dict[str, dict]:
    """Each data file the old payload names, as it named it; its checksum was never taken."""
    data = {}
    for role, keys in DATA_KEYS.items():
        named = next((old[k] for k in keys if isinstance(old.get(k), str)), None)
        if named is not None:
            data[role] = {"path": named, "sha256": None}
            unknown[f"data.{role}.sha256"] = NOT_RECORDED + " (only the file's name was)"
    return data


def _text(old: dict, *keys: str) -> str | None:
    """A string at `keys` (nested) of the old payload, or None."""
    value: Any = old
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def _revision(old: dict) -> str | None:
    """bench/generality.py cost's "revision": the full hash of the checkout it ran from."""
    revision = _text(old, "revision")
    return revision if revision and len(revision) == 40 and set(revision) <= HEX else None


def _provenance(old: dict, unknown: dict[str, str]) -> dict[str, Any]:
    """The envelope's fields that an old payload recorded itself (bench/baselines.py's thread count
    and versions under "machine")."""
    machine = old.get("machine") if isinstance(old.get("machine"), dict) else {}
    wall = old.get("wall_s")
    found = {"model.name": _text(old, "model"), "n": _first_int(old, N_KEYS), "seed": _first_int(old, ("seed",)),
             "method.name": _text(old, "method"),
             "method.config": old.get("config") if isinstance(old.get("config"), dict) else None,
             "threads": _first_int(old, THREAD_KEYS) or _first_int(machine, ("cpu_threads",)),
             "timings.finished": _text(old, "date"),
             "timings.wall_s": wall if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None,
             "versions.python": _text(machine, "python"), "versions.torch": _text(machine, "torch"),
             "git.revision": _revision(old)}
    unknown.update({field: NOT_RECORDED for field, value in found.items() if value is None})
    return found


def wrap(name: str, old: dict) -> dict:
    """The schema record of an old payload from file `name`, the payload itself unchanged."""
    unknown: dict[str, str] = {}
    script = script_of(name)
    if script is None:
        unknown["protocol.script"] = f"{name} matches no bench script's file names (a record made by hand?)"
    unknown["protocol.argv"] = NOT_RECORDED
    data = _data(old, unknown)
    found = _provenance(old, unknown)
    for field in FIELDS:  # versions, git, fingerprint, load, the rest of the timings: never recorded
        if field not in found and field not in ("protocol.script", "protocol.argv"):
            unknown.setdefault(field, NOT_RECORDED)
    return {
        "schema": SCHEMA,
        "protocol": {"script": script, "argv": None},
        "data": data,
        "model": {"name": found["model.name"], "fingerprint": None},
        "n": found["n"], "seed": found["seed"],
        "method": {"name": found["method.name"], "config": found["method.config"]},
        "versions": {name: found.get(f"versions.{name}") for name in ("python", *PACKAGES)},
        "git": {"revision": found["git.revision"], "dirty": None},
        "threads": found["threads"],
        "load": {"start": None, "end": None},
        "timings": {"started": None, "finished": found["timings.finished"], "wall_s": found["timings.wall_s"]},
        "unknown": dict(sorted(unknown.items())),
        "result": old,
    }


# a key to fill: its path in the payload, its value and why that value
Fill = tuple[tuple[str | int, ...], Any, str]


def _meg_fills(r: dict) -> Iterator[Fill]:
    yield ("edits_applied",), r["n"], "bench/meg.py scored every edit it applied then"
    if "specificity" not in r["metrics"]:
        yield ("score_all",), None, "the run measured no specificity, so no Score of all eight numbers"
    yield ("config", "fit", "exclude_eval_templates"), "none", "stage A held no test wordings out then"


def _baseline_fills(r: dict) -> Iterator[Fill]:
    if "specificity" not in r["metrics"]:
        yield ("score_all",), None, "the run measured no specificity, so no Score of all eight numbers"


def _generator_fills(r: dict) -> Iterator[Fill]:
    """The DiT of before recorded neither its prediction nor its network (generator/model.py's _upgrade)."""
    for i, row in enumerate(r["rows"]):
        if "steps_grid" in row:  # a kind sampled by diffusion: the DiT (bench/generator.py grids only those)
            yield ("rows", i, "config", "prediction"), "v", "the DiT predicted v then"
            yield ("rows", i, "network"), {}, "its sizes are not known; what the DiT of then fixed is filled in"
            yield ("rows", i, "network", "unit_condition"), False, "the DiT took the raw condition then"
            yield ("rows", i, "network", "cond_dropout"), 0.2, "every DiT preset dropped the condition at 0.2 then"
            yield ("rows", i, "network", "cond_token"), False, "the DiT added no condition token then"


def _sweep_fills(r: dict) -> Iterator[Fill]:
    yield ("threads",), 1, "the thread count the results tables have shown for the run"
    for i, row in enumerate(r["rows"]):
        if "v_steps" not in row["settings"]:  # FT: no covariance, no value search
            continue
        if "cov_source" in r:  # the file's, where the rows did not name it
            yield ("rows", i, "settings", "cov_source"), r["cov_source"], "the run's one covariance source"
        yield ("rows", i, "settings", "context_prefixes"), 0, "MEMIT had no context prefixes then"
        yield ("rows", i, "settings", "kl_factor"), 0, "MEMIT had no KL term then"
        reused = 0 if row["settings"].get("values_reused_batches") == 0 else None
        yield ("rows", i, "settings", "values_reused_edits"), reused, (
            "no batch of values was reused" if reused == 0 else "no reuse of values recorded")


def _serve_fills(r: dict) -> Iterator[Fill]:
    yield ("workload",), "alternate", "bench/serve_load.py had one workload then"


def _pipeline_fills(r: dict) -> Iterator[Fill]:
    yield ("generator",), "mlp", "the default generator then"
    yield ("resumed",), False, "bench/pipeline.py could not resume then"
    yield ("processes",), 1, "stage A and the evaluation ran in one process then"


# file-name prefix -> the keys its bench script writes today that its runs of before lack
FILLS: tuple[tuple[str, Callable[[dict], Iterator[Fill]]], ...] = (
    ("meg-", _meg_fills), ("baseline-", _baseline_fills), ("generator-", _generator_fills),
    ("baseline_sweep-", _sweep_fills), ("serve-load-", _serve_fills), ("pipeline-", _pipeline_fills))


def fill(name: str, record: dict) -> list[str]:
    """Fill the missing keys of record's payload that FILLS names for file `name`, each with its
    reason under "unknown"; the fields filled."""
    filled = []
    for prefix, fills in FILLS:
        if not name.startswith(prefix):
            continue
        for path, value, why in fills(record["result"]):  # lazily: a key filled is there for the next
            *parents, key = path
            node = record["result"]
            for part in parents:
                node = node[part]
            if key not in node:
                node[key] = value
                field = ".".join(map(str, ("result", *path)))
                record["unknown"][field] = f"{NOT_WRITTEN}; filled with {json.dumps(value)}: {why}"
                filled.append(field)
    record["unknown"] = dict(sorted(record["unknown"].items()))
    return filled


def migrate(path: Path) -> str:
    """Wrap one file (unless it follows the schema already) and fill its payload's missing keys;
    what was done, in a word."""
    from megedit.io import atomic_write_json

    obj = json.loads(path.read_text())
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: not a JSON object, cannot wrap it")
    outcome = "kept"
    if is_record(obj):
        check(obj, str(path))
    else:
        obj, outcome = wrap(path.name, obj), "wrapped"
    filled = fill(path.name, obj)
    if filled:
        print(f"{path.name}: filled {', '.join(filled)}")
        outcome = "filled" if outcome == "kept" else outcome
    if outcome != "kept":
        atomic_write_json(path, check(obj, str(path)))
    return outcome


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(RESULTS.glob("*.json"))
    done = {"kept": 0, "wrapped": 0, "filled": 0}
    for path in paths:
        outcome = migrate(path)
        done[outcome] += 1
        if outcome == "wrapped":
            print(f"{path.name}: wrapped")
    print(f"{done['wrapped']} wrapped, {done['filled']} filled, {done['kept']} already in {SCHEMA} and complete")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
