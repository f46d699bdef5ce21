"""The results page's summary: one line per question a reader asks first, each answer read from
the result files that hold it (bench/update_readme.py writes it into docs/results.md)."""

from __future__ import annotations

from tables_common import load_one, table  # noqa: E402 (bench/ is this folder)

BASELINES = (("alphaedit", "AlphaEdit"), ("memit", "MEMIT"), ("ft", "FT"))


def _score(name: str) -> str:
    result = load_one(name)
    return "—" if result is None else f"{result['score']:.1f}"


def _spec(name: str) -> str:
    result = load_one(name)
    if result is None or "specificity" not in result["metrics"]:
        return "—"
    return f"{result['metrics']['specificity']['ag']:.1f}"


def _baselines(n: int) -> str:
    return ", ".join(f"{_score(f'baseline-cf-{n}-{method}.json')} ({label})" for method, label in BASELINES)


def _real_use() -> str:
    result = load_one("meg-cf.json")
    if result is None or "specificity" not in result["metrics"]:
        return "—"
    chat = result["chat"]
    return (f"SpecAG {result['metrics']['specificity']['ag']:.1f}; chat replies hold the new answer "
            f"{chat['edited']['holds']:.1f}% of the time (base model {chat['base']['holds']:.1f}%)")


def _whole_job(name: str, how: str) -> str:
    result = load_one(name)
    return "—" if result is None else f"{result['total_s'] / 60:.1f} min, fit and evaluation, {how}"


def in_short_table() -> str:
    rows = [
        ["MeG against the baselines, 1,024 CounterFact edits",
         f"Score {_score('meg-cf.json')} with the defaults ({_score('meg-cf-no-negatives-no-chat.json')} without "
         f"negatives and chat wording) against {_baselines(1024)}", "[runs](#meg-and-baseline-runs)"],
        ["the same at 10,000 edits",
         f"Score {_score('meg-cf-10000.json')}, SpecAG {_spec('meg-cf-10000.json')} with the defaults "
         f"({_score('meg-cf-10000-no-negatives-no-chat.json')} "
         f"without negatives and chat wording) against {_baselines(10000)}",
         "[scale curve](#scale-curve)"],
        ["ZsRE, 998 edits", f"{_score('meg-zs.json')} with the defaults, {_score('meg-zs-no-negatives-no-chat.json')} "
         "without negatives and chat wording", "[runs](#meg-and-baseline-runs)"],
        ["wordings the edits never trained on",
         f"{_score('meg-cf-exclude-own.json')} at 1,024 CounterFact edits, without negatives and chat wording",
         "[fitting other wordings](#fitting-other-wordings)"],
        ["other questions about an edited subject, and chat", _real_use(),
         "[real use](#real-use-specificity-and-chat)"],
        ["the learned generator against a lookup",
         f"the lookup is at least as good everywhere; {_score('meg-cf-10000-no-negatives-no-chat.json')} against "
         f"{_score('meg-cf-10000-mlp.json')} at 10,000", "[generator](#what-the-learned-generator-adds)"],
        ["the whole job at 1,024 CounterFact edits", _whole_job("pipeline-cf-1024.json", "one process on 2 threads"),
         "[whole job](#the-whole-job-as-a-user-runs-it)"],
        ["the whole job at 10,000 edits", _whole_job("pipeline-cf-swap-10000-processes2.json", "two processes"),
         "[whole job](#the-whole-job-as-a-user-runs-it)"],
    ]
    return table(["question", "answer", "section"], rows)
