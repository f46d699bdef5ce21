"""argparse types of the `megedit` verbs: a value no verb could use is a usage error, found
before any data or model is loaded (and before torch is imported)."""

from __future__ import annotations

import re
from argparse import ArgumentTypeError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
# spelling on the command line -> the name torch and transformers use
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


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


def non_negative_int(text: str) -> int:
    """A count that may be 0 (0 turns the thing off)."""
    value = _int_from(text, 0)
    if value is None:
        raise ArgumentTypeError(f"expected an integer from 0, found {text!r}")
    return value


def layer_list(text: str) -> list[int]:
    """Comma-separated 0-based layers, e.g. '4,5,6'."""
    layers = [_int_from(x, 0) for x in text.split(",")]
    if None in layers:
        raise ArgumentTypeError(f"expected comma-separated layers (integers from 0), found {text!r}")
    return layers


def id_list(text: str) -> list[str]:
    """Comma-separated case ids, e.g. 'e1,e7' (spaces around each are dropped)."""
    ids = [x.strip() for x in text.split(",")]
    if not all(ids):
        raise ArgumentTypeError(f"expected comma-separated case ids, found {text!r}")
    return ids


def non_empty(text: str) -> str:
    """Text with something in it besides spaces."""
    if not text.strip():
        raise ArgumentTypeError(f"expected non-empty text, found {text!r}")
    return text


def device(text: str) -> str:
    """cpu, cuda, cuda:N, mps or auto (whether the machine has it is checked when the model loads)."""
    name = text.strip().lower()
    if name in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise ArgumentTypeError(f"expected one of {', '.join(DEVICES)}, found {text!r}")


def dtype(text: str) -> str:
    """float32, bfloat16, float16 (or bf16, fp16, fp32) or auto (the checkpoint's own dtype)."""
    name = DTYPES.get(text.strip().lower())
    if name is None:
        raise ArgumentTypeError(f"expected one of float32, bfloat16, float16, auto, found {text!r}")
    return name


def scalar(kind: type, optional: bool = False):
    """The argparse type of a config field of type `kind` (int, float or str); with `optional`,
    'none' or 'null' give None (e.g. `--router-epsilon none`: calibrate, whatever a config file says)."""
    plain = {int: "an integer", float: "a number", str: "text"}[kind]

    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise ArgumentTypeError(f"expected {plain}{' or none' if optional else ''}, found {text!r}") from None

    parse.__name__ = kind.__name__
    return parse
