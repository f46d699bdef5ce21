"""The "nearest" router kind: a bank of the edits' normalised embeddings (their prompts, and their
other wordings and negatives as the router adds them); a query's distance is 1 - cosine to the
nearest edit wording (0 .. 2). No training; measured to separate paraphrases from unrelated
queries better than the entropy net (bench/routing.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MeGError


class NearestKind:
    """The "nearest" router: a bank of the edits' normalised embeddings; distance = 1 - cosine.
    `build` and `load` give the Router's fields (router.py makes the Router)."""

    holds_wordings = True  # the edits' other wordings join the bank
    trains = False  # the bank is the embeddings themselves

    def max_distance(self, config: object) -> float:
        return 2.0

    def distance_label(self, config: object) -> str:
        return "1 - cosine to the nearest edit prompt"

    def build(self, edit_embeddings: torch.Tensor, config: object, progress: bool, desc: str) -> dict:
        bank = nn.functional.normalize(edit_embeddings.detach().float(), dim=-1)
        return {"bank": bank, "record": {"training": {"n": len(bank), "seconds": 0.0}}}

    def load(self, path: Path, tensors: dict, config: object, dim: int) -> dict:
        _check_nearest(path, tensors, dim)
        return {name: tensors.get(name) for name in ("bank", "negatives", "negative_margins", "wordings",
                                                      "wording_edits")}


def _check_nearest(path: Path, tensors: dict, dim: int) -> None:
    """A nearest router's tensors: an (N, dim) bank, optional (M, dim) negatives with optional (M,)
    margins, and (W, dim) wordings with W bank rows (each below N) naming their edits."""
    matrices = {k: t for k, t in tensors.items() if k not in ("wording_edits", "negative_margins")}
    ok = "bank" in tensors and set(tensors) <= {"bank", "negatives", "negative_margins", "wordings", "wording_edits"}
    ok = ok and all(t.ndim == 2 and t.shape[1] == dim for t in matrices.values())
    ok = ok and ("wordings" in tensors) == ("wording_edits" in tensors)
    if ok and "negative_margins" in tensors:
        margins = tensors["negative_margins"]
        ok = "negatives" in tensors and margins.shape == (len(tensors["negatives"]),)
    if ok and "wordings" in tensors:
        owners = tensors["wording_edits"]
        ok = owners.ndim == 1 and len(owners) == len(tensors["wordings"]) and bool(
            ((owners >= 0) & (owners < len(tensors["bank"]))).all())
    if not ok:
        raise MeGError(f"{path}: expected an (N, {dim}) tensor 'bank', optional (M, {dim}) 'negatives' (their (M,) "
                       f"'negative_margins'), (W, {dim}) 'wordings' with their bank rows in 'wording_edits', for a "
                       f"nearest router")
