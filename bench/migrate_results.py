"""Wrap every result file of before the schema (bench/result_schema.py) into it, in place.

Re-runnable and idempotent: a file that already follows the schema is only checked. An old file
becomes the schema's "result" payload unchanged (so every table reads the same numbers); what
its payload recorded (model, n, seed, method, config, threads, data names, date) is copied up into
the envelope, and every other provenance field is null with its reason under "unknown": nothing
is guessed. Run it after any bench script of before the schema wrote a file:

    PYTHONPATH=src .venv/bin/python bench/migrate_results.py [FILE ...]   (default: bench/results/*.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from result_schema import FIELDS, PACKAGES, RESULTS, SCHEMA, check, is_record  # noqa: E402 (bench/ is this folder)

NOT_RECORDED = "not recorded by the bench script of before the schema"
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


def migrate(path: Path) -> str:
    """Wrap one file (unless it follows the schema already); what was done, in a word."""
    from megedit.io import atomic_write_json

    obj = json.loads(path.read_text())
    if is_record(obj):
        check(obj, str(path))
        return "kept"
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: not a JSON object, cannot wrap it")
    atomic_write_json(path, check(wrap(path.name, obj), str(path)))
    return "wrapped"


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(RESULTS.glob("*.json"))
    done = {"kept": 0, "wrapped": 0}
    for path in paths:
        outcome = migrate(path)
        done[outcome] += 1
        if outcome == "wrapped":
            print(f"{path.name}: wrapped")
    print(f"{done['wrapped']} wrapped, {done['kept']} already in {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
