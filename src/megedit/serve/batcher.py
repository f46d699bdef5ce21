"""The model's one worker thread, with continuous batching: requests queue up as rows (one
prompt or conversation each, already tokenized); between decoding steps the worker admits queued
rows into the running batch (routed once each, their prompts run as one prefill, then joined to
the batch's KV cache), takes one step for every row, and lets each row go the moment its answer
ends. Each row keeps its own neuron vector (zero for base-model rows) and sampling settings.

A row that fails, for any reason, fails alone: a failed batch step re-runs each of its rows on its
own (prompt and answer so far), so the rows that do not fail carry on.

Nothing here knows HTTP: each row carries a `sink`, called from the worker thread with
("start", label), ("delta", text), ("done", {"text", "finish_reason"}) or ("error", exception).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import MeGError
from .steps import Cohort, Sampling, pick

log = logging.getLogger(__name__)

Sink = Callable[[tuple[str, Any]], None]
BASE_LABEL = {"edit_fired": False, "edit_id": None, "distance": None}


class QueueFull(Exception):
    """The queue holds its most rows or tokens; the caller should answer 503."""


class TooLarge(MeGError):
    """One request asks for more than the whole queue holds; the caller should answer 400."""


@dataclass(frozen=True)
class Settings:
    """A row's generation settings. Rows with any settings share decoding steps."""

    chat: bool
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Ticket:
    """One request: its rows not yet admitted, and whether its client has gone."""

    left: int
    cancelled: bool = False


@dataclass
class Row:
    ids: list[int]  # the prompt's tokens (the pack's prompt format or the chat template applied)
    route_text: str  # what the router sees: the raw prompt, or the last user message
    edit: bool  # False: the base model for this row (its neuron vector is zero)
    settings: Settings
    sink: Sink
    request_id: str = "-"
    ticket: Ticket | None = field(default=None, repr=False)

    @property
    def cost(self) -> int:
        """What the row can take of the model: its prompt and its longest answer, in tokens."""
        return len(self.ids) + self.settings.max_tokens


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, None if none is there."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class RowText:
    """One row's answer as its tokens arrive: decoded whole each time (so multi-token characters
    come out right) and sent on only once it can no longer change, so the deltas join to exactly
    the final text (stripped, cut before a stop string)."""

    def __init__(self, row: Row, tokenizer, ends: set[int]) -> None:
        self.row, self.tokenizer, self.ends = row, tokenizer, ends
        self.tokens: list[int] = []
        self.sent, self.stopped = "", False

    def add(self, token: int) -> None:
        if token in self.ends:
            self.stopped = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        cut = stop_at(text, self.row.settings.stop)
        if cut is not None:
            self.stopped = True
            self._send(text[:cut].rstrip())
            return
        self._send(_settled(text, self.row.settings.stop))

    def finish(self, made: int) -> None:
        """Send what is left of the answer (`made` tokens, end token included), then its end."""
        answer = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        cut = stop_at(answer, self.row.settings.stop)
        text = answer if cut is None else answer[:cut].rstrip()
        self._send(text)
        hit_limit = not self.stopped and made >= self.row.settings.max_tokens
        self.row.sink(("done", {"text": text, "finish_reason": "length" if hit_limit else "stop"}))

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.row.sink(("delta", text[len(self.sent):]))
            self.sent = text


def _settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing text that later tokens cannot change: not trailing spaces (the
    answer is stripped), a half-decoded character, or the start of a possible stop string."""
    text = text.rstrip().removesuffix("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


@dataclass
class Live:
    """A row being answered: its routing, sampling, tokens so far and text."""

    row: Row
    label: dict
    vector: torch.Tensor
    sampling: Sampling
    text: RowText
    tokens: list[int] = field(default_factory=list)  # every token picked; the last is not in the cache yet
    started: bool = False


class Batcher:
    """The queue and the worker thread that owns the model (see the module docstring).
    `max_queue` and `max_queue_tokens` bound the rows waiting and their prompt + max_tokens;
    `max_batch` and `max_batch_tokens` the rows decoding, the latter as their number times the
    longest one's prompt + max_tokens (the padded KV cache they can grow to)."""

    def __init__(self, edited, *, max_batch: int = 32, max_batch_tokens: int = 65536, max_queue: int = 64,
                 max_queue_tokens: int = 65536, wait_s: float = 0.005) -> None:
        self.edited, self.max_batch, self.max_queue, self.wait_s = edited, max_batch, max_queue, wait_s
        self.max_batch_tokens, self.max_queue_tokens = max_batch_tokens, max_queue_tokens
        self.stats = {"requests": 0, "rejected": 0, "cancelled": 0, "failed": 0, "batches": 0, "rows": 0,
                      "largest_batch": 0, "steps": 0, "step_rows": 0}
        self._rows: list[Row] = []
        self._tokens = 0  # the waiting rows' cost
        self.active = 0  # rows being decoded
        self._cond = threading.Condition()
        self._closed = False
        self._ends = {False: set(edited.answer_end_ids()), True: set(edited.end_of_turn_ids())}
        tokenizer = edited.tokenizer
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._thread = threading.Thread(target=self._loop, name="megedit-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Rows queued, not yet admitted to the batch."""
        return len(self._rows)

    @property
    def waiting_tokens(self) -> int:
        return self._tokens

    def submit(self, rows: list[Row]) -> Ticket:
        """Queue one request's rows; QueueFull when they do not fit beside the rows waiting,
        TooLarge when they would not fit in an empty queue either."""
        cost = sum(r.cost for r in rows)
        if len(rows) > self.max_queue or cost > self.max_queue_tokens:
            raise TooLarge(f"the request holds {len(rows)} prompts and {cost} tokens (prompt + max_tokens); the "
                           f"server queues at most {self.max_queue} prompts and {self.max_queue_tokens} tokens")
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._rows) + len(rows) > self.max_queue or self._tokens + cost > self.max_queue_tokens:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._rows)} prompts ({self._tokens} tokens) are waiting; retry later")
            ticket = Ticket(len(rows))
            for row in rows:
                row.ticket = ticket
            self._rows += rows
            self._tokens += cost
            self.stats["requests"] += 1
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request's client has gone (or its answer is complete): its queued rows leave the
        queue now, its decoding rows before the next step."""
        with self._cond:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            gone = [r for r in self._rows if r.ticket is ticket]
            if gone:
                self._rows = [r for r in self._rows if r.ticket is not ticket]
                self._tokens -= sum(r.cost for r in gone)
                self.stats["cancelled"] += len(gone)

    def close(self) -> None:
        """Stop the worker after its current step; rows still queued get an error, not silence."""
        with self._cond:
            self._closed, left, self._rows, self._tokens = True, self._rows, [], 0
            self._cond.notify_all()
        for row in left:
            _tell(row, ("error", QueueFull("the server is shutting down")))

    # -- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        cohort: Cohort | None = None
        live: list[Live] = []
        while (joining := self._take(cohort, live)) is not None:
            try:
                cohort, live = self._drop_cancelled(cohort, live)
                if joining:
                    cohort, live = self._join(cohort, live, joining)
                if live:
                    cohort, live = self._step(cohort, live)
            except Exception as error:  # the worker must outlive anything; the rows in hand fail
                for row in {id(r): r for r in [x.row for x in live] + joining}.values():
                    self._fail(row, error)
                cohort, live = None, []
            self.active = len(live)
        for x in live:
            _tell(x.row, ("error", QueueFull("the server is shutting down")))

    def _take(self, cohort: Cohort | None, live: list[Live]) -> list[Row] | None:
        """Queued rows to admit now (None once closed). With nothing decoding, waits for a row,
        then `wait_s` for more to share its prefill; otherwise takes what fits without waiting
        (nothing when the running cache cannot take joiners)."""
        with self._cond:
            busy = cohort is not None
            while not self._rows and not self._closed and not busy:
                self._cond.wait()
            if self._closed:
                return None
            if busy and not cohort.joinable:
                return []
            free = self.max_batch - (len(cohort) if busy else 0)
            deadline = time.monotonic() + self.wait_s
            while not busy and len(self._rows) < free and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            count = self._fitting([x.row.cost for x in live], self._rows[:free])
            taken, self._rows = self._rows[:count], self._rows[count:]
            self._tokens -= sum(r.cost for r in taken)
            for row in taken:
                row.ticket.left -= 1
            return taken

    def _fitting(self, costs: list[int], rows: list[Row]) -> int:
        """How many of `rows`, in order, join the rows of `costs` within max_batch_tokens (one
        always does when nothing is decoding: a prompt's length is bounded on its own)."""
        count, longest = 0, max(costs, default=0)
        for row in rows:
            longest = max(longest, row.cost)
            if (len(costs) + count + 1) * longest > self.max_batch_tokens and (costs or count):
                break
            count += 1
        return count

    def _drop_cancelled(self, cohort: Cohort | None, live: list[Live]) -> tuple[Cohort | None, list[Live]]:
        keep = [i for i, x in enumerate(live) if not x.row.ticket.cancelled]
        self.stats["cancelled"] += len(live) - len(keep)
        return self._drop(cohort, live, keep)

    def _join(self, cohort: Cohort | None, live: list[Live], rows: list[Row]) -> tuple[Cohort | None, list[Live]]:
        """Route the new rows (once each), run their prompts, and add them to the batch."""
        new = self._routed(rows)
        if not new:
            return cohort, live
        self.stats["batches"] += 1
        self.stats["rows"] += len(new)
        fresh, new = self._advance(*self._prefill(new))
        if fresh is None:
            return cohort, live
        if cohort is None:
            cohort, live = fresh, new
        else:
            cohort.join(fresh)
            live = live + new
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
        return cohort, live

    def _routed(self, rows: list[Row]) -> list[Live]:
        """Each row's neuron vector and `megedit` label, routed as a batch; if that fails, row by row."""
        try:
            return self._route(rows)
        except Exception as error:
            if len(rows) == 1:
                self._fail(rows[0], error)
                return []
            return [x for row in rows for x in self._routed([row])]

    def _route(self, rows: list[Row]) -> list[Live]:
        vectors = torch.zeros(len(rows), self.edited.spec.size)
        labels = [dict(BASE_LABEL) for _ in rows]
        edited = [i for i, r in enumerate(rows) if r.edit]
        if edited:
            routing = self.edited.routing([rows[i].route_text for i in edited])
            vectors[edited] = routing.vectors
            for k, i in enumerate(edited):
                fired, edit = bool(routing.fired[k]), routing.edits[k]
                labels[i] = {"edit_fired": fired, "edit_id": None if edit is None else str(edit),
                             "distance": round(max(0.0, float(routing.distance[k])), 6)}  # not -0.0
        tokenizer = self.edited.tokenizer
        return [Live(r, label, vector, self._sampling(r.settings), RowText(r, tokenizer, self._ends[r.settings.chat]))
                for r, label, vector in zip(rows, labels, vectors)]

    def _sampling(self, s: Settings) -> Sampling:
        if s.temperature == 0:
            return Sampling()
        generator = torch.Generator()  # the row's own RNG: its draws do not depend on its batch partners
        generator.manual_seed(s.seed if s.seed is not None else random.getrandbits(64))
        return Sampling(s.temperature, s.top_p, generator)

    def _prefill(self, live: list[Live]) -> tuple[Cohort | None, list[Live], torch.Tensor | None]:
        """Run the rows' prompts (and answers so far) as one batch: the cohort, the rows, their
        next-token logits. If the batch fails, each row alone, so that only a failing row fails."""
        try:
            cohort, logits = self._run_prefill(live)
        except Exception as error:
            if len(live) == 1:
                self._fail(live[0].row, error)
                return None, [], None
            return self._one_by_one(live)
        for x in live:
            if not x.started:
                x.started = True
                _tell(x.row, ("start", x.label))
        return cohort, live, logits

    def _run_prefill(self, live: list[Live]) -> tuple[Cohort, torch.Tensor]:
        vectors = torch.stack([x.vector for x in live])
        return Cohort.prefill(self.edited.model, self.edited.neuron, [x.row.ids + x.tokens for x in live], vectors,
                              self._pad)

    def _one_by_one(self, live: list[Live]) -> tuple[Cohort | None, list[Live], torch.Tensor | None]:
        """Each row run alone; the rows that pass are one batch again (their caches joined, or,
        where caches cannot be joined, run again together)."""
        alone = [(x, *self._prefill([x])) for x in live]
        kept = [(x, cohort, logits) for x, cohort, _, logits in alone if cohort is not None]
        if not kept:
            return None, [], None
        if not all(cohort.joinable for _, cohort, _ in kept):
            return self._prefill([x for x, _, _ in kept])
        cohort = kept[0][1]
        for _, other, _ in kept[1:]:
            cohort.join(other)
        return cohort, [x for x, _, _ in kept], torch.cat([logits for _, _, logits in kept])

    def _step(self, cohort: Cohort, live: list[Live]) -> tuple[Cohort | None, list[Live]]:
        """One decoding step for every row; a failed step re-runs each row alone (its prompt and
        answer so far), which also gives its next token."""
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(live)
        try:
            logits = cohort.step([x.tokens[-1] for x in live])
        except Exception:
            log.warning("serve: a decoding step of %d rows failed; running each row alone", len(live),
                        exc_info=True)
            return self._advance(*self._one_by_one(live))
        return self._advance(cohort, live, logits)

    def _advance(self, cohort: Cohort | None, live: list[Live],
                 logits: torch.Tensor | None) -> tuple[Cohort | None, list[Live]]:
        """Each row takes its next token; rows whose answer ended (or failed) leave the batch."""
        going = []
        for i, x in enumerate(live):
            try:
                x.tokens.append(pick(logits[i], x.sampling))
                x.text.add(x.tokens[-1])
                if x.text.stopped or len(x.tokens) >= x.row.settings.max_tokens:
                    x.text.finish(len(x.tokens))
                else:
                    going.append(i)
            except Exception as error:
                self._fail(x.row, error)
        return self._drop(cohort, live, going)

    def _drop(self, cohort: Cohort | None, live: list[Live], keep: list[int]) -> tuple[Cohort | None, list[Live]]:
        if len(keep) == len(live):
            return cohort, live
        if not keep:
            return None, []
        cohort.keep(keep)
        return cohort, [live[i] for i in keep]

    def _fail(self, row: Row, error: BaseException) -> None:
        """Answer one row with its error; the detail goes to the log, under the request's id."""
        self.stats["failed"] += 1
        log.error("serve: request %s: a row failed: %s: %s", row.request_id, type(error).__name__, error,
                  exc_info=error)
        _tell(row, ("error", error))


def _tell(row: Row, event: tuple[str, Any]) -> None:
    """Hand an event to the row's request; a sink that fails must not take the worker down."""
    try:
        row.sink(event)
    except Exception:
        log.exception("serve: request %s: its sink failed", row.request_id)
