"""EvalReport: what every number in the docs and benchmarks comes from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json

METRIC_NAMES = {"reliability": "Rel", "generality": "Gen", "locality": "Loc"}


@dataclass
class EvalReport:
    method: str
    model: str
    data: str
    n: int
    protocol: dict
    metrics: dict  # {"reliability": {"ag": %, "tf": %}, "generality": ..., "locality": ...}
    score: float
    timing: dict
    cases: list = field(default_factory=list)
    edit: dict = field(default_factory=dict)  # the method's settings, seed and edit time

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        return cls(**json.loads(Path(path).read_text()))

    def row(self) -> list[str]:
        """Method, the six metrics and Score, formatted for a table."""
        cells = [self.method]
        for kind in METRIC_NAMES:
            for setting in ("ag", "tf"):
                value = self.metrics.get(kind, {}).get(setting)
                cells.append("—" if value is None else f"{value:.2f}")
        return cells + [f"{self.score:.2f}"]

    def table(self) -> str:
        header = ["method"] + [f"{short}{s.upper()}" for short in METRIC_NAMES.values() for s in ("ag", "tf")]
        return markdown_table(header + ["Score"], [self.row()])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
