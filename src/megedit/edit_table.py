"""The edits an edit pack holds, in fit order: what adding and removing edits needs to change a
pack without refitting it (docs/living-edits.md).

Row i is the edit whose prompt is row i of the nearest router's bank, so the router's nearest
index names an edit. Per edit: its case id, prompt and target, the other wordings stage A fitted
with the prompt, its fitted neuron vector and whether the fit passed. The generator's training
pairs are rebuilt from these: the pack's encoder embeds the wordings again, each mapped to its
edit's vector (storing the texts costs far less than their embeddings would).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .data.requests import EditRequest
from .errors import MeGError
from .io import atomic_save_tensors, atomic_write_json, load_tensors, read_record

EDIT_FILES = ("edits.safetensors", "edits.json")


@dataclass
class EditTable:
    case_ids: list[str]
    prompts: list[str]
    targets: list[str]
    wordings: list[tuple[str, ...]]  # per edit, its other wordings (stage A's variants), the prompt not among them
    vectors: torch.Tensor  # (N, size): the fitted neuron vectors
    fitted: torch.Tensor  # (N,) bool: stage A's success test passed (only these train the generator)

    def __post_init__(self) -> None:
        n = len(self.case_ids)
        sizes = {len(self.prompts), len(self.targets), len(self.wordings), len(self.vectors), len(self.fitted)}
        if sizes != {n} or self.vectors.ndim != 2:
            raise MeGError(f"edit table: {n} case ids but {sorted(sizes)} rows elsewhere "
                           f"(vectors of shape {tuple(self.vectors.shape)})")

    @classmethod
    def from_fit(cls, requests: Sequence[EditRequest], variants: Sequence[Sequence[str]], vectors: torch.Tensor,
                 success: torch.Tensor) -> "EditTable":
        return cls([r.case_id for r in requests], [r.prompt for r in requests], [r.target for r in requests],
                   [tuple(v) for v in variants], vectors.detach().float().cpu(), success.bool().cpu())

    def __len__(self) -> int:
        return len(self.case_ids)

    def requests(self, rows: Sequence[int] | None = None) -> list[EditRequest]:
        """The edits (of `rows`, default all) as requests: prompt and target; their test queries are not kept."""
        rows = range(len(self)) if rows is None else rows
        return [EditRequest(self.case_ids[i], self.prompts[i], self.targets[i]) for i in rows]

    def rows_of(self, ids: Sequence[str]) -> list[int]:
        """The rows of these case ids (each must be in the table)."""
        where = {c: i for i, c in enumerate(self.case_ids)}
        return [where[i] for i in ids]

    def rows_matching(self, requests: Sequence[EditRequest]) -> list[int]:
        """Rows that share a case id or a prompt with one of `requests` (the facts they replace)."""
        ids, prompts = {r.case_id for r in requests}, {r.prompt for r in requests}
        return [i for i, (c, p) in enumerate(zip(self.case_ids, self.prompts)) if c in ids or p in prompts]

    def select(self, rows: Sequence[int]) -> "EditTable":
        idx = torch.tensor(list(rows), dtype=torch.long)
        return EditTable([self.case_ids[i] for i in rows], [self.prompts[i] for i in rows],
                         [self.targets[i] for i in rows], [self.wordings[i] for i in rows],
                         self.vectors[idx], self.fitted[idx])

    def __add__(self, other: "EditTable") -> "EditTable":
        return EditTable(self.case_ids + other.case_ids, self.prompts + other.prompts, self.targets + other.targets,
                         self.wordings + other.wordings, torch.cat([self.vectors, other.vectors]),
                         torch.cat([self.fitted, other.fitted]))

    def pairs(self, rows: Sequence[int], augment: bool) -> tuple[list[str], list[int]]:
        """The generator's training conditions among `rows` and the row each maps to: the fitted
        edits' prompts first (the first ones validate), then, with `augment`, their other wordings."""
        ok = [i for i in rows if self.fitted[i]]
        extra = [(w, i) for i in ok for w in self.wordings[i]] if augment else []
        return [self.prompts[i] for i in ok] + [w for w, _ in extra], ok + [i for _, i in extra]

    def save(self, directory: Path) -> None:
        """edits.safetensors (vectors, fitted) and edits.json (ids, prompts, targets, wordings)."""
        atomic_save_tensors(directory / EDIT_FILES[0], {"vectors": self.vectors.float(),
                                                        "fitted": self.fitted.to(torch.uint8)})
        atomic_write_json(directory / EDIT_FILES[1], {"edits": [
            {"case_id": c, "prompt": p, "target": t, "wordings": list(w)}
            for c, p, t, w in zip(self.case_ids, self.prompts, self.targets, self.wordings)]})

    @classmethod
    def load(cls, directory: Path) -> "EditTable":
        path = directory / EDIT_FILES[0]
        tensors = load_tensors(path, "edit table")
        rows = read_record(path, "edit table", lambda m: [
            (str(e["case_id"]), str(e["prompt"]), str(e["target"]), tuple(map(str, e["wordings"]))) for e in m["edits"]])
        if set(tensors) != {"vectors", "fitted"}:
            raise MeGError(f"{path}: expected tensors 'vectors' and 'fitted', found {sorted(tensors)}")
        columns = [list(c) for c in zip(*rows)] if rows else [[], [], [], []]
        return cls(*columns, tensors["vectors"].float(), tensors["fitted"].bool())
