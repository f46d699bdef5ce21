"""What every results table is made with: the result files' folder, loading them, and Markdown tables.

Tables read result files only through `load`, `load_one` and `load_records`: each file is checked
against the schema (bench/result_schema.py) and the table sees its payload (with `load_records`, the
whole record: the method's config too)."""

from __future__ import annotations

from result_schema import RESULTS, ROOT, read  # noqa: E402,F401 (bench/ is this folder; ROOT for the pages)

METRICS = [("reliability", "ag"), ("reliability", "tf"), ("generality", "ag"), ("generality", "tf"),
           ("locality", "ag"), ("locality", "tf")]  # the paper's six numbers, in its order


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows])


def load(pattern: str) -> list[dict]:
    """The payloads of the result files matching `pattern`, in name order."""
    return [read(p)["result"] for p in sorted(RESULTS.glob(pattern))]


def load_records(pattern: str) -> list[dict]:
    """The whole records (provenance and payload) of the result files matching `pattern`, in name order."""
    return [read(p) for p in sorted(RESULTS.glob(pattern))]


def load_one(name: str) -> dict | None:
    """The payload of one result file, or None where it was not made."""
    path = RESULTS / name
    return read(path)["result"] if path.exists() else None


def metric(result: dict, kind: str, setting: str) -> str:
    """One metric of a result, or a dash where its evaluation did not ask that query kind."""
    value = result["metrics"].get(kind, {}).get(setting)
    return "—" if value is None else f"{value:.1f}"


def revisions(record: dict) -> str:
    """A two-revision result's "before / after"; a working tree is named by its commit."""
    r, git = record["result"], record["git"]
    after = f"`{r['after']}`" if r["after"] != "working tree" else \
        f"`{git['revision'][:7]}`{' and uncommitted changes' * bool(git['dirty'])}"
    return f"`{r['before']}` / {after}"
