"""The one shape of a file in bench/results/, its check, and the writer every bench script uses.

A result is an envelope of provenance around the script's own payload:

    schema      "megedit-bench-result/1"
    protocol    {"script": "bench/meg.py", "argv": [...]}: what was run, with which arguments
    data        {role: {"path": ..., "sha256": ...}}: each data file read ("edits", "pool", ...)
    model       {"name": ..., "fingerprint": ...}: megedit.model_fingerprint of the base weights
    n, seed     the number of edits (or items) measured and the seed
    method      {"name": ..., "config": {...}}: the method and its full configuration
    versions    {"python", "torch", "transformers", "megedit"}: package versions
    git         {"revision": ..., "dirty": ...}: the checkout, dirty when tracked code outside
                bench/results differed from it
    threads     torch's intra-op thread count
    load        {"start": [1, 5, 15 min], "end": [...]}: os.getloadavg when the script started and
                when it wrote the result (other work on the machine slows a timing)
    timings     {"started", "finished" (ISO UTC), "wall_s", ...}: any more timings of the script
    unknown     {"dotted.field": reason}: every provenance field that is null says here why
    result      the script's payload (metrics, rows, ...), whose shape the script owns

Results written before this schema were wrapped by bench/migrate_results.py: what their payload
recorded is copied up, everything else is null with its reason under "unknown". It also fills the
payload keys a bench script writes today that its older runs lack (its FILLS, each with its reason
under "unknown" as "result.<key>"), so the table writer reads one payload shape per script.
Stdlib only: the table writer and the tests read results without loading torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from megedit.io import file_sha256

SCHEMA = "megedit-bench-result/1"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "transformers", "megedit")

# taken when a bench script imports this module, i.e. when it starts
LOAD_AT_START = list(os.getloadavg())
STARTED_AT = time.time()

_NUMBER = (int, float)
# each provenance field (dotted path) and the types its value may have; null needs a reason in "unknown"
FIELDS: dict[str, tuple[type, ...]] = {
    "protocol.script": (str,), "protocol.argv": (list,),
    "model.name": (str,), "model.fingerprint": (str,),
    "n": (int,), "seed": (int,),
    "method.name": (str,), "method.config": (dict,),
    **{f"versions.{name}": (str,) for name in ("python", *PACKAGES)},
    "git.revision": (str,), "git.dirty": (bool,),
    "threads": (int,),
    "load.start": (list,), "load.end": (list,),
    "timings.started": (str,), "timings.finished": (str,), "timings.wall_s": _NUMBER,
}
TOP_LEVEL = ("schema", "protocol", "data", "model", "n", "seed", "method", "versions", "git", "threads", "load",
             "timings", "unknown", "result")


class ResultError(ValueError):
    """A result that does not follow the schema."""


def _lookup(record: Mapping, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a dotted field."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:  # bool is an int to isinstance; n=True is no count
        return False
    return isinstance(value, types)


def _data_problems(data: Any, unknown: Mapping) -> list[str]:
    if not isinstance(data, Mapping):
        return ["data: not an object of role -> {path, sha256}"]
    problems = []
    for role, entry in data.items():
        if not isinstance(entry, Mapping) or set(entry) != {"path", "sha256"} or not isinstance(entry["path"], str):
            problems.append(f"data.{role}: not {{path: str, sha256}}")
        elif entry["sha256"] is None and f"data.{role}.sha256" not in unknown:
            problems.append(f"data.{role}.sha256: null without a reason in unknown")
        elif entry["sha256"] is not None and not isinstance(entry["sha256"], str):
            problems.append(f"data.{role}.sha256: not a string")
    return problems


def problems(record: Any) -> list[str]:
    """Everything in `record` that breaks the schema (empty: a valid result)."""
    if not isinstance(record, Mapping):
        return ["not a JSON object"]
    if record.get("schema") != SCHEMA:
        return [f"schema: {record.get('schema')!r}, expected {SCHEMA!r} (a result of before it? "
                "bench/migrate_results.py wraps it)"]
    found = [f"{key}: missing" for key in TOP_LEVEL if key not in record]
    found += [f"{key}: not part of the schema" for key in record if key not in TOP_LEVEL]
    unknown = record.get("unknown")
    if not isinstance(unknown, Mapping) or not all(isinstance(v, str) and v for v in unknown.values()):
        return found + ["unknown: not an object of field -> reason"]
    for dotted, types in FIELDS.items():
        present, value = _lookup(record, dotted)
        if not present:
            found.append(f"{dotted}: missing")
        elif value is None and dotted not in unknown:
            found.append(f"{dotted}: null without a reason in unknown")
        elif value is not None and not _type_ok(value, types):
            found.append(f"{dotted}: {type(value).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    found += _data_problems(record.get("data"), unknown)
    if not isinstance(record.get("result"), Mapping):
        found.append("result: not an object")
    return found


def check(record: Any, where: str = "result") -> dict:
    """`record` itself when it follows the schema; ResultError naming each problem otherwise."""
    found = problems(record)
    if found:
        raise ResultError(f"{where} breaks {SCHEMA}: " + "; ".join(found))
    return record


def is_record(obj: Any) -> bool:
    """Whether `obj` claims the schema (it may still break it: see `problems`)."""
    return isinstance(obj, Mapping) and obj.get("schema") == SCHEMA


def read(path: str | Path) -> dict:
    """A result file, checked against the schema (the table writer reads only these)."""
    return check(json.loads(Path(path).read_text()), str(path))


def payload(path: str | Path) -> dict:
    """The script's own payload of a result file; a file of before the schema is its own payload
    (bench scripts resuming from or reading an earlier run's file accept both)."""
    obj = json.loads(Path(path).read_text())
    return check(obj, str(path))["result"] if is_record(obj) else obj


def _shown_path(path: Path) -> str:
    """A data path relative to the repository where it can be (a clone's results stay comparable)."""
    try:
        return os.path.relpath(path.resolve(), ROOT)
    except ValueError:  # another drive (Windows)
        return str(path)


def _data_entries(data: Mapping[str, str | Path], unknown: dict[str, str]) -> dict[str, dict]:
    entries = {}
    for role, path in data.items():
        path = Path(path)
        if path.is_file():
            entries[role] = {"path": _shown_path(path), "sha256": file_sha256(path)}
        else:
            entries[role] = {"path": str(path), "sha256": None}
            unknown.setdefault(f"data.{role}.sha256", "not a file when the result was written")
    return entries


def _versions(unknown: dict[str, str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
            unknown[f"versions.{name}"] = "not installed"
    return versions


def _git(unknown: dict[str, str]) -> dict[str, str | bool | None]:
    """The checkout's revision, and whether tracked files outside bench/results differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        revision = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))
    except (OSError, subprocess.SubprocessError) as err:
        unknown["git.revision"] = unknown["git.dirty"] = f"git failed: {err}"
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": dirty}


def _threads(unknown: dict[str, str]) -> int | None:
    torch = sys.modules.get("torch")  # only a script that loaded torch has a thread count to report
    if torch is None:
        unknown.setdefault("threads", "torch not loaded by the writing process")
        return None
    return torch.get_num_threads()


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _plain(config: Any) -> Any:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else config


def build(result: Mapping, *, model: str | None, n: int | None, seed: int | None, method: str | None,
          config: Any = None, data: Mapping[str, str | Path] | None = None, fingerprint: str | None = None,
          threads: int | None = None, timings: Mapping[str, Any] | None = None,
          unknown: Mapping[str, str] | None = None) -> dict:
    """The schema's record of `result` (the script's payload), its provenance filled in here:
    script and arguments, data checksums, versions, git, threads, load and the script's wall time.
    Null fields need their reason in `unknown` (an unfingerprinted model gets one here)."""
    reasons = dict(unknown or {})
    if fingerprint is None:
        reasons.setdefault("model.fingerprint", "not computed by this script")
    now = time.time()
    record = {
        "schema": SCHEMA,
        "protocol": {"script": _shown_path(Path(sys.argv[0])) if sys.argv[0] else "-c", "argv": sys.argv[1:]},
        "data": _data_entries(data or {}, reasons),
        "model": {"name": model, "fingerprint": fingerprint},
        "n": n, "seed": seed,
        "method": {"name": method, "config": _plain(config)},
        "versions": _versions(reasons), "git": _git(reasons),
        "threads": threads if threads is not None else _threads(reasons),
        "load": {"start": LOAD_AT_START, "end": list(os.getloadavg())},
        "timings": {"started": _iso(STARTED_AT), "finished": _iso(now), "wall_s": round(now - STARTED_AT, 3),
                    **(timings or {})},
        "unknown": reasons,
        "result": dict(result),
    }
    for field in [f for f in reasons if f in FIELDS and _lookup(record, f)[1] is not None]:
        del reasons[field]  # a caller's reason for a field that was filled after all
    return record


def write_result(path: str | Path, result: Mapping, **provenance: Any) -> Path:
    """Check and atomically write `result` (the script's payload) as a schema record (see `build`
    for `provenance`); a record that breaks the schema raises ResultError and nothing is written."""
    from megedit.io import atomic_write_json

    return atomic_write_json(path, check(build(result, **provenance), str(path)))
