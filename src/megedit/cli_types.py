"""argparse types of the `megedit` verbs: a value no verb could use is a usage error, found
before any data or model is loaded."""

from __future__ import annotations

from argparse import ArgumentTypeError


def _int_from(text: str, low: int) -> int | None:
    """int(text) when it is at least `low`, else None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= low else None


def positive_int(text: str) -> int:
    """A count or size of at least 1 (0 or less would fail late, or silently do nothing)."""
    value = _int_from(text, 1)
    if value is None:
        raise ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def layer_list(text: str) -> list[int]:
    """Comma-separated 0-based layers, e.g. '4,5,6'."""
    layers = [_int_from(x, 0) for x in text.split(",")]
    if None in layers:
        raise ArgumentTypeError(f"expected comma-separated layers (integers from 0), found {text!r}")
    return layers


def non_empty(text: str) -> str:
    """Text with something in it besides spaces."""
    if not text.strip():
        raise ArgumentTypeError(f"expected non-empty text, found {text!r}")
    return text
