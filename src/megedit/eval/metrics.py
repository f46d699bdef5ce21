"""The scoring rules of METHOD.md §3, as small pure functions."""

from __future__ import annotations

from typing import Sequence


def normalize_answer(text: str) -> str:
    """Compare answers case-insensitively, without surrounding space or trailing dots."""
    return text.strip().lower().rstrip(".").strip()


def first_line(text: str) -> str:
    """Generated text up to the first newline (where AG decoding stops)."""
    return text.split("\n", 1)[0]


def ag_match(output: str, expected: str) -> bool:
    """AG credit: the generated answer equals the expected one after normalisation."""
    return normalize_answer(first_line(output)) == normalize_answer(expected)


def could_still_match(partial: str, expected: str) -> bool:
    """Whether some continuation of the partial output `partial` can still ag_match `expected`.

    Lets AG decoding stop a row as soon as its outcome is decided, with the same credit.
    """
    if partial.endswith("\ufffd"):  # half of a multi-byte character: undecided
        return True
    if "\n" in partial:
        return ag_match(partial, expected)
    text, goal = partial.lstrip().lower(), normalize_answer(expected)
    if len(text) <= len(goal):
        return goal.startswith(text)
    return text.startswith(goal) and not text[len(goal) :].strip(". \t")


def tf_accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """TF credit: the share of expected tokens that the teacher-forced argmax gets right."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"expected {len(expected)} predictions (> 0), found {len(predicted)}")
    return sum(p == e for p, e in zip(predicted, expected)) / len(expected)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (one broken metric sinks the Score)."""
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def percent(values: Sequence[float]) -> float:
    """Mean of per-case credits (bools or fractions) in percent."""
    return 100.0 * sum(float(v) for v in values) / len(values) if values else float("nan")
