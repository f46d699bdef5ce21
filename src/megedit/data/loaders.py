"""Loaders for edit data: EasyEdit and ROME CounterFact, MEND ZsRE, and megedit's own JSONL.

Every loader reads a local file (never the network) and checks each record it returns; bad
input stops with one line naming the file, the record index and the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from ..io import parse_text
from .prompts import format_fields
from .requests import EditRequest, LocalityQuery

log = logging.getLogger(__name__)


class _Record:
    """One raw record with typed accessors whose errors name file, record and field."""

    def __init__(self, path: Path, index: int, raw: Any) -> None:
        self.path, self.index, self.raw = path, index, raw
        if not isinstance(raw, dict):
            self.fail(None, f"expected a JSON object, found {type(raw).__name__}")

    def fail(self, field: str | None, problem: str):
        where = f"{self.path.name}: record {self.index}"
        raise DataError(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")

    def get(self, dotted: str) -> Any:
        value: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                self.fail(dotted, "missing")
            value = value[part]
        return value

    def text(self, field: str, optional: bool = False) -> str | None:
        if optional and not self.has(field):
            return None
        value = self.get(field)
        if not isinstance(value, str) or not value.strip():
            self.fail(field, f"expected a non-empty string, found {_describe(value)}")
        return value.strip()

    def texts(self, field: str, optional: bool = False) -> tuple[str, ...]:
        """A string or a list of strings; an absent optional field gives ()."""
        if optional and not self.has(field):
            return ()
        value = self.get(field)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
            self.fail(field, f"expected a string or a list of non-empty strings, found {_describe(value)}")
        return tuple(v.strip() for v in items)

    def identifier(self, field: str) -> str:
        if not self.has(field):
            return str(self.index)
        value = self.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
            self.fail(field, f"expected an integer or a non-empty string, found {_describe(value)}")
        return str(value).strip()

    def has(self, dotted: str) -> bool:
        value: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(value, dict) or value.get(part) is None:
                return False
            value = value[part]
        return True


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value[:40])
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"


def _easyedit_counterfact(r: _Record) -> EditRequest:
    locality = r.text("locality_prompt", optional=True)
    return EditRequest(
        case_id=r.identifier("case_id"),
        prompt=r.text("prompt"),
        target=r.text("target_new"),
        subject=r.text("subject", optional=True),
        ground_truth=r.text("ground_truth", optional=True),
        rephrases=r.texts("rephrase_prompt", optional=True),
        locality=(LocalityQuery(locality, r.text("locality_ground_truth", optional=True)),) if locality else (),
    )


def _rome_counterfact(r: _Record) -> EditRequest:
    template, subject = r.text("requested_rewrite.prompt"), r.text("requested_rewrite.subject")
    if format_fields(template) != [""]:  # template.format(subject) fails on, or is changed by, any other field
        r.fail("requested_rewrite.prompt",
               f"expected a '{{}}' where the subject goes and no other '{{...}}' field, found {template[:60]!r}")
    truth = r.text("requested_rewrite.target_true.str", optional=True)
    return EditRequest(
        case_id=r.identifier("case_id"),
        prompt=template.format(subject),
        target=r.text("requested_rewrite.target_new.str"),
        subject=subject,
        ground_truth=truth,
        rephrases=r.texts("paraphrase_prompts", optional=True),
        # neighbourhood subjects share the true object of the edited fact
        locality=tuple(LocalityQuery(p, truth) for p in r.texts("neighborhood_prompts", optional=True)),
    )


def clean_nq_question(text: str) -> str:
    """'nq question: who wrote x' -> 'Who wrote x?' (MEND's NQ locality questions)."""
    text = text.strip()
    if text.lower().startswith("nq question:"):
        text = text[len("nq question:") :].strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _mend_zsre(r: _Record) -> EditRequest:
    answers = r.texts("answers", optional=True)
    loc = r.text("loc", optional=True)
    return EditRequest(
        case_id=r.identifier("case_id"),
        prompt=r.text("src"),
        target=r.text("alt"),
        subject=r.text("subject", optional=True),
        ground_truth=answers[0] if answers else r.text("pred", optional=True),
        rephrases=r.texts("rephrase", optional=True),
        locality=(LocalityQuery(clean_nq_question(loc), r.text("loc_ans", optional=True)),) if loc else (),
    )


def _own_jsonl(r: _Record) -> EditRequest:
    locality = r.get("locality") if r.has("locality") else []
    if not isinstance(locality, list):
        r.fail("locality", f"expected a list, found {_describe(locality)}")
    queries = []
    for i, item in enumerate(locality):
        if isinstance(item, str) and item.strip():
            queries.append(LocalityQuery(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip():
            answer = item.get("answer")
            queries.append(LocalityQuery(item["prompt"].strip(), answer.strip() if isinstance(answer, str) else None))
        else:
            r.fail(f"locality[{i}]", f"expected a string or {{'prompt': ..., 'answer': ...}}, found {_describe(item)}")
    return EditRequest(
        case_id=r.identifier("case_id"),
        prompt=r.text("prompt"),
        target=r.text("target"),
        subject=r.text("subject", optional=True),
        ground_truth=r.text("ground_truth", optional=True),
        rephrases=r.texts("rephrases", optional=True),
        locality=tuple(queries),
        specificity=r.texts("specificity", optional=True),
    )


def _counterfact(r: _Record) -> EditRequest:
    """CounterFact in either layout, told apart by the record's fields."""
    return _rome_counterfact(r) if isinstance(r.raw, dict) and "requested_rewrite" in r.raw else _easyedit_counterfact(r)


KINDS: dict[str, Callable[[_Record], EditRequest]] = {
    "counterfact": _counterfact,  # EasyEdit or ROME layout
    "rome": _rome_counterfact,
    "zsre": _mend_zsre,
    "jsonl": _own_jsonl,
}


def _read_records(path: Path, kind: str) -> list:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if kind == "jsonl":
        return [_parse_json(line, path.name, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _parse_json(text, path.name)
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _parse_json(text: str, where: str, line: int | None = None) -> Any:
    """One JSON document: a whole file, or (with `line`) one line of a JSONL file."""
    if line:
        where = f"{where}: line {line}"
    try:
        return parse_text(text)
    except json.JSONDecodeError as e:
        problem = f"column {e.colno}: {e.msg}" if line else f"line {e.lineno} column {e.colno}: {e.msg}"
    except ValueError as e:  # nested too deeply
        problem = str(e)
    raise DataError(f"{where}: not valid JSON ({problem})")


def load_requests(kind: str, path: str | Path, limit: int | None = None, offset: int = 0,
                  skip_invalid: bool = False) -> list[EditRequest]:
    """Read edit requests from a local file: records `offset` .. `offset + limit` of it.

    kind: "counterfact" (EasyEdit or ROME layout), "rome", "zsre" (MEND) or "jsonl" (megedit's
    own: one `EditRequest.to_dict()` object per line). A malformed record stops the load with a
    DataError, unless `skip_invalid` (then it is left out, with a warning naming it).
    """
    _check_kind(kind)
    if limit is not None and limit < 1 or offset < 0:
        raise DataError(f"limit must be at least 1 and offset at least 0, found limit={limit} offset={offset}")
    path = Path(path)
    raw = _read_records(path, kind)
    end = len(raw) if limit is None else min(len(raw), offset + limit)
    requests, seen, skipped = [], {}, []
    for index in range(offset, end):
        try:
            record = _Record(path, index, raw[index])
            request = KINDS[kind](record)
            if request.case_id in seen:
                record.fail("case_id", f"duplicate id {request.case_id!r} (first used by record {seen[request.case_id]})")
        except DataError as error:
            if not skip_invalid:
                raise
            skipped.append(str(error))
            continue
        seen[request.case_id] = index
        requests.append(request)
    if skipped:
        log.warning("skipped %d invalid record(s): %s", len(skipped), "; ".join(skipped))
    if not requests:
        raise DataError(f"{path.name}: no usable records in range {offset}..{end} (the file has {len(raw)})")
    return requests


def count_records(kind: str, path: str | Path) -> int:
    """How many records the file holds, valid or not (what `offset` and `limit` of load_requests count)."""
    _check_kind(kind)
    return len(_read_records(Path(path), kind))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def parse_data_arg(value: str) -> tuple[str, Path]:
    """'KIND:PATH' (the CLI's --data) -> (kind, path)."""
    kind, sep, path = value.partition(":")
    if not sep or kind not in KINDS or not path:
        raise DataError(f"--data must be KIND:PATH with KIND one of {', '.join(KINDS)}, found {value!r}")
    return kind, Path(path)
