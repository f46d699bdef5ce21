"""EvalReport: what every number in the docs and benchmarks comes from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_json

METRIC_NAMES = {"reliability": "Rel", "generality": "Gen", "locality": "Loc", "specificity": "Spec"}


@dataclass
class EvalReport:
    method: str
    model: str
    data: str
    n: int
    protocol: dict
    metrics: dict  # {"reliability": {"ag": %, "tf": %}, "generality": ..., "locality": ...}
    score: float  # the paper's: harmonic mean of the six Rel/Gen/Loc numbers
    timing: dict
    cases: list = field(default_factory=list)
    edit: dict = field(default_factory=dict)  # the method's settings, seed and edit time
    score_all: float | None = None  # harmonic mean of every metric, specificity included (None without it)
    chat: dict = field(default_factory=dict)  # chat rates, edited and base (eval/chat.py); {} when not asked

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        return cls(**json.loads(Path(path).read_text()))

    def row(self) -> list[str]:
        """Method, the eight metrics, the paper's Score and the Score over all, formatted for a table."""
        cells = [self.method]
        for kind in METRIC_NAMES:
            for setting in ("ag", "tf"):
                value = self.metrics.get(kind, {}).get(setting)
                cells.append("—" if value is None else f"{value:.2f}")
        return cells + [f"{self.score:.2f}", "—" if self.score_all is None else f"{self.score_all:.2f}"]

    def table(self) -> str:
        header = ["method"] + [f"{short}{s.upper()}" for short in METRIC_NAMES.values() for s in ("ag", "tf")]
        table = markdown_table(header + ["Score", "Score (all 8)"], [self.row()])
        if self.chat:
            rates = [[who] + [f"{self.chat[who][r]:.1f}" for r in ("holds", "ends", "degenerate")]
                     for who in ("edited", "base")]
            table += "\n\n" + markdown_table([f"chat ({self.chat['n']} replies)", "holds target %",
                                               f"ends within {self.chat['budget']} tokens %", "degenerate %"], rates)
        return table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
