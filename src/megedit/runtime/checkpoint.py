"""The checkpoint of a resumable decode: the finished batches of a run of the greedy decoder
(runtime/decoding.py), kept on disk so that a killed evaluation or pre-edit reference resumes
where it stopped."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_json
from ..lm import Decoded
from ..parallel import barrier, ranks

log = logging.getLogger(__name__)


class Checkpoint:
    """The finished batches of one evaluation, written atomically at most every `every_s`
    seconds (and after each query kind), so that a killed evaluation resumes where it stopped; removed once it completes.
    Its key covers the subject (method, settings, weights) and every query and setting, so a
    file left by a different evaluation is ignored, never mixed in."""

    every_s = 60.0

    def __init__(self, path: Path, key: str, parts: bool = True) -> None:
        self.path, self.key = Path(path), key
        self.kinds: dict[str, dict] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("key") == key:
                self.kinds = saved["kinds"]
            else:
                log.warning("%s was written by a different evaluation; starting afresh", self.path)
        if parts:
            self.absorb_parts()  # those a killed run's forked processes left
        if self.kinds:
            log.info("resuming the evaluation from %s (%d queries done)", self.path,
                     sum(len(k["rows"]) for k in self.kinds.values()))
        self.saved_at = time.perf_counter()

    @classmethod
    def shared(cls, path: Path, key: str) -> "Checkpoint":
        """The checkpoint as every rank of a torch.distributed group opens it: rank 0 takes in what a
        killed run's parts left, then the others read the result (one process: `Checkpoint(path, key)`)."""
        rank, world = ranks()
        if world == 1:
            return cls(path, key)
        import torch.distributed as dist

        keys = [key]  # rank 0's: a subject's description may hold times that differ between ranks
        dist.broadcast_object_list(keys, src=0)
        key = keys[0]
        first = cls(path, key) if rank == 0 else None
        barrier()
        return first or cls(path, key, parts=False)

    def reload(self) -> None:
        """Read the file again (another rank wrote it)."""
        self.kinds = Checkpoint(self.path, self.key, parts=False).kinds

    @staticmethod
    def part_path(path: Path, k: int) -> Path:
        return path.with_name(f"{path.name}.part{k + 1}")

    def absorb_parts(self) -> dict[str, float]:
        """Take in the batches the forked processes' part files hold (then delete them); returns
        their times. The parts ran side by side: their wall time is the longest part's, and the
        forward / decoding-step times are scaled to it (their shares of the parts' summed time)."""
        found = sorted(self.path.parent.glob(self.path.name + ".part*"))
        parts = [Checkpoint(path, self.key, parts=False).kinds for path in found]
        times: dict[str, float] = {}
        for kind in {kind for part in parts for kind in part}:
            entries = [part[kind] for part in parts if kind in part]
            wall, total = max(e["seconds"] for e in entries), sum(e["seconds"] for e in entries)
            mine = self.kinds.setdefault(kind, {"rows": {}, "seconds": 0.0, "forward_s": 0.0, "steps_s": 0.0})
            for e in entries:
                mine["rows"].update(e["rows"])
            for field in ("seconds", "forward_s", "steps_s"):
                share = wall if field == "seconds" else wall * sum(e[field] for e in entries) / max(total, 1e-9)
                mine[field] += share
                times[field] = times.get(field, 0.0) + share
        if found:
            self.save()
            for path in found:
                path.unlink()
        return times

    def rows(self, kind: str) -> dict[int, tuple[list[int], list[int]]]:
        return {int(i): tuple(v) for i, v in self.kinds.get(kind, {}).get("rows", {}).items()}

    def seconds(self, kind: str) -> dict[str, float]:
        """What the batches restored for `kind` took when they ran."""
        return {k: v for k, v in self.kinds.get(kind, {}).items() if k != "rows"}

    def add(self, kind: str, idx: Sequence[int], out: Decoded, seconds: float) -> None:
        entry = self.kinds.setdefault(kind, {"rows": {}, "seconds": 0.0, "forward_s": 0.0, "steps_s": 0.0})
        for k, i in enumerate(idx):
            entry["rows"][str(i)] = [out.forced[k], out.generated[k]]
        entry["seconds"] += seconds
        entry["forward_s"] += out.forward_s
        entry["steps_s"] += out.steps_s
        if time.perf_counter() - self.saved_at >= self.every_s:
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"key": self.key, "kinds": self.kinds})
        self.saved_at = time.perf_counter()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

