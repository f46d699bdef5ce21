"""How often the subject megedit takes from a prompt (data/subjects.py, for facts that name none)
is the subject the data gives, on every file of the project that gives one. No model runs.

    .venv/bin/python bench/subjects.py

Result: bench/results/subjects.json (per file: records, exact matches, part of the subject, another
span, none found, and a few misses to read).
"""

from __future__ import annotations

import sys
from pathlib import Path

from result_schema import write_result

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared/data"


def files() -> list[tuple[str, Path]]:
    from megedit.data.demo import DEMO_EDITS, DEMO_POOL, FALLBACK_POOL, SENTENCE_FACTS

    return [("counterfact", SHARED / "counterfact/counterfact-edit.json"),
            ("counterfact", SHARED / "counterfact/counterfact-train.json"),
            ("zsre", SHARED / "zsre/zsre_mend_train-1k.json"),
            ("jsonl", DEMO_EDITS), ("jsonl", DEMO_POOL), ("jsonl", FALLBACK_POOL), ("jsonl", SENTENCE_FACTS)]


def kind_of(given: str, inferred: str | None) -> str:
    """How an inferred subject compares with the given one."""
    if inferred is None:
        return "none"
    if inferred == given:
        return "exact"
    return "part" if inferred.lower() in given.lower() else "other"


def score(requests) -> dict:
    from megedit.data.subjects import infer_subject

    given = [(r.prompt, r.subject, infer_subject(r.prompt)) for r in requests if r.subject]
    kinds = [kind_of(g[1], g[2]) for g in given]
    shares = {k: 100.0 * kinds.count(k) / len(given) for k in ("exact", "part", "other", "none")}
    misses = [list(g) for k in ("part", "other", "none") for g, gk in zip(given, kinds) if gk == k][:5]
    return {"records": len(given), **shares, "misses": misses}


def main() -> int:
    from megedit import load_requests

    rows = {}
    for kind, path in files():
        rows[path.name] = score(load_requests(kind, path, skip_invalid=True))
        print(path.name, {k: v for k, v in rows[path.name].items() if k != "misses"})
    write_result(HERE / "results" / "subjects.json", {"files": rows}, model=None, n=None, seed=None,
                 method="infer_subject", data={name: path for (_, path), name in zip(files(), rows)},
                 unknown={"model.name": "no model runs", "n": "one count per file", "seed": "nothing is drawn",
                          "method.config": "infer_subject has no settings"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
