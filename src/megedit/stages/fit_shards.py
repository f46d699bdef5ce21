"""Stage A's finished edits on disk: shards keyed per edit (its digest) under the settings' key, so a
killed fit resumes and parts, processes and ranks sharing a work dir see each other's edits."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch

from ..io import atomic_save_tensors, load_tensors

log = logging.getLogger(__name__)


class Shards:
    """Finished edits written to `work_dir/fit-<settings key>/shard-*.safetensors` as they finish,
    each with its digest and its share of the wall time since the shard before."""

    def __init__(self, work_dir, key: str, every: int = 64) -> None:
        self.dir = Path(work_dir) / f"fit-{key}"
        self.every, self.pending, self.since = every, [], time.perf_counter()

    def restore(self, state) -> None:
        found = {}
        for path in sorted(self.dir.glob("shard-*.safetensors")):
            t = load_tensors(path, "fit shard")
            share = float(t["seconds"]) / len(t["edits"])
            wordings_ok = t.get("wordings_ok", t["success"].float())  # shards from before variants: the prompt alone
            for j, digest in enumerate(t["edits"]):
                found[bytes(digest.tolist())] = (t["vectors"][j], bool(t["success"][j]), t["steps"][j], t["loss"][j],
                                                 wordings_ok[j], share)
        for i in state.mine:
            digest = state.digests[i]
            if digest in found:
                vector, ok, steps, loss, wordings_ok, share = found[digest]
                state.vectors[i], state.success[i], state.steps[i], state.loss[i] = vector, ok, steps, loss
                state.wordings_ok[i] = wordings_ok
                state.done[i] = True
                state.timing["reused_edits"] += 1
                state.timing["reused_s"] += share
        if found:
            log.info("%d of %d edits fitted before (%s)", int(state.done.sum()), len(state.mine), self.dir)

    def flush(self, state) -> None:
        last = bool(state.done[state.mine].all())
        if not self.pending or (len(self.pending) < self.every and not last):
            return
        idx = torch.tensor(self.pending, dtype=torch.long)
        edits = torch.tensor([list(state.digests[i]) for i in self.pending], dtype=torch.uint8)
        now = time.perf_counter()
        tensors = {"edits": edits, "vectors": state.vectors[idx], "success": state.success[idx].to(torch.uint8),
                   "steps": state.steps[idx], "loss": state.loss[idx], "wordings_ok": state.wordings_ok[idx],
                   "seconds": torch.tensor(now - self.since, dtype=torch.float64)}
        name = hashlib.sha256(edits.numpy().tobytes()).hexdigest()[:16]
        atomic_save_tensors(self.dir / f"shard-{name}.safetensors", tensors)  # whole or absent
        self.pending, self.since = [], now
