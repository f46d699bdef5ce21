"""The edits an edit pack holds, in fit order: what adding and removing edits needs to change a
pack without refitting it (docs/living-edits.md).

Row i is the edit whose prompt is row i of the nearest router's bank, so the router's nearest
index names an edit. Per edit: its case id, prompt and target, the other wordings stage A fitted
with the prompt, its fitted neuron vector and whether the fit passed, its subject (what the question
gate masks; None where not known); and, where known, the condition embeddings of its prompt and
wordings (the pack's encoder's, stored as float16), so that adding edits to a pack encodes only the
new edits' wordings, not the whole pack's again. The generator's training pairs are built from
these, each wording mapped to its edit's vector.
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
    # per edit, the encoder's embeddings of its prompt and then its wordings ((1 + wordings, d)), or None: not computed
    embeddings: list[torch.Tensor | None] | None = None
    subjects: list[str | None] | None = None  # per edit, its subject, or None: not known (packs from before)

    def __post_init__(self) -> None:
        n = len(self.case_ids)
        if self.embeddings is None:
            self.embeddings = [None] * n
        if self.subjects is None:
            self.subjects = [None] * n
        sizes = {len(self.prompts), len(self.targets), len(self.wordings), len(self.vectors), len(self.fitted),
                 len(self.embeddings), len(self.subjects)}
        if sizes != {n} or self.vectors.ndim != 2:
            raise MeGError(f"edit table: {n} case ids but {sorted(sizes)} rows elsewhere "
                           f"(vectors of shape {tuple(self.vectors.shape)})")

    @classmethod
    def from_fit(cls, requests: Sequence[EditRequest], variants: Sequence[Sequence[str]], vectors: torch.Tensor,
                 success: torch.Tensor) -> "EditTable":
        return cls([r.case_id for r in requests], [r.prompt for r in requests], [r.target for r in requests],
                   [tuple(v) for v in variants], vectors.detach().float().cpu(), success.bool().cpu(),
                   subjects=[r.subject or None for r in requests])

    def __len__(self) -> int:
        return len(self.case_ids)

    def requests(self, rows: Sequence[int] | None = None) -> list[EditRequest]:
        """The edits (of `rows`, default all) as requests: prompt, target and subject; their test queries are
        not kept."""
        rows = range(len(self)) if rows is None else rows
        return [EditRequest(self.case_ids[i], self.prompts[i], self.targets[i], subject=self.subjects[i])
                for i in rows]

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
                         self.vectors[idx], self.fitted[idx], [self.embeddings[i] for i in rows],
                         [self.subjects[i] for i in rows])

    def __add__(self, other: "EditTable") -> "EditTable":
        return EditTable(self.case_ids + other.case_ids, self.prompts + other.prompts, self.targets + other.targets,
                         self.wordings + other.wordings, torch.cat([self.vectors, other.vectors]),
                         torch.cat([self.fitted, other.fitted]), self.embeddings + other.embeddings,
                         self.subjects + other.subjects)

    def pairs(self, rows: Sequence[int], augment: bool, encoder,
              progress: bool = True) -> tuple[torch.Tensor, list[int]]:
        """The generator's training pairs among `rows`: their condition embeddings and the row each
        maps to, the fitted edits' prompts first (the first ones validate), then, with `augment`,
        their other wordings. Embeddings the table holds are used; the others are computed by
        `encoder` (a SentenceEncoder) and kept in the table."""
        ok = [i for i in rows if self.fitted[i]]
        missing = [i for i in ok if self.embeddings[i] is None]
        if missing:
            texts = [t for i in missing for t in (self.prompts[i], *self.wordings[i])]
            flat = encoder.encode(texts, progress=progress).float().cpu()
            blocks = flat.split([1 + len(self.wordings[i]) for i in missing])
            for i, block in zip(missing, blocks):
                self.embeddings[i] = block
        extra = [(i, j) for i in ok for j in range(1, 1 + len(self.wordings[i]))] if augment else []
        cond = [self.embeddings[i][0] for i in ok] + [self.embeddings[i][j] for i, j in extra]
        if not cond:
            return torch.zeros(0, 0), []
        return torch.stack([c.float() for c in cond]), ok + [i for i, _ in extra]

    def save(self, directory: Path) -> None:
        """edits.safetensors (vectors, fitted; the embeddings known, float16, and which edits they are
        of) and edits.json (ids, prompts, targets, wordings, subjects)."""
        tensors = {"vectors": self.vectors.float(), "fitted": self.fitted.to(torch.uint8)}
        known = [e for e in self.embeddings if e is not None]
        if known:
            tensors["embedded"] = torch.tensor([e is not None for e in self.embeddings], dtype=torch.uint8)
            tensors["embeddings"] = torch.cat(known).half()
        atomic_save_tensors(directory / EDIT_FILES[0], tensors)
        atomic_write_json(directory / EDIT_FILES[1], {"edits": [
            {"case_id": c, "prompt": p, "target": t, "wordings": list(w), **({"subject": s} if s else {})}
            for c, p, t, w, s in zip(self.case_ids, self.prompts, self.targets, self.wordings, self.subjects)]})

    @classmethod
    def load(cls, directory: Path) -> "EditTable":
        path = directory / EDIT_FILES[0]
        tensors = load_tensors(path, "edit table")
        rows = read_record(path, "edit table", lambda m: [
            (str(e["case_id"]), str(e["prompt"]), str(e["target"]), tuple(map(str, e["wordings"])),
             None if e.get("subject") is None else str(e["subject"])) for e in m["edits"]])
        optional = {"embeddings", "embedded"}  # both or neither
        if set(tensors) - optional != {"vectors", "fitted"} or len(set(tensors) & optional) == 1:
            raise MeGError(f"{path}: expected tensors 'vectors' and 'fitted' (and 'embeddings' with 'embedded'), "
                           f"found {sorted(tensors)}")
        columns = [list(c) for c in zip(*rows)] if rows else [[], [], [], [], []]
        return cls(*columns[:4], tensors["vectors"].float(), tensors["fitted"].bool(),
                   _embeddings(path, tensors, columns[3]), columns[4])


def _embeddings(path: Path, tensors: dict, wordings: list[tuple[str, ...]]) -> list[torch.Tensor | None]:
    """Per edit, its block of the stored embeddings (1 + its wordings rows), or None."""
    if "embedded" not in tensors:
        return [None] * len(wordings)
    embedded, flat = tensors["embedded"].bool().tolist(), tensors["embeddings"]
    sizes = [1 + len(w) for w, e in zip(wordings, embedded) if e]
    if len(embedded) != len(wordings) or flat.ndim != 2 or sum(sizes) != len(flat):
        raise MeGError(f"{path}: 'embeddings' has {len(flat)} rows for {len(embedded)} edits marked in "
                       f"'embedded', whose prompts and wordings need {sum(sizes)} ({len(wordings)} edits in "
                       f"edits.json)")
    blocks = iter(flat.float().split(sizes))
    return [next(blocks) if e else None for e in embedded]
