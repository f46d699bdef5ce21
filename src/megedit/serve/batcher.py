"""The model's one worker thread: requests queue up as rows (one prompt or conversation each),
the worker takes the oldest row and the queued rows that share its generation settings (up to
`max_batch`, waiting a few ms for more), routes them, and answers them with one batched
generate() call in which each row keeps its own neuron vector (zero for base-model rows).

Nothing here knows HTTP: each row carries a `sink`, called from the worker thread with
("start", label), ("delta", text), ("done", {"text", "finish_reason"}) or ("error", exception).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.generation.streamers import BaseStreamer

from ..errors import MeGError
from ..lm import context_length

log = logging.getLogger(__name__)

Sink = Callable[[tuple[str, Any]], None]


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests; the caller should answer 503."""


@dataclass(frozen=True)
class Settings:
    """What the rows of one generate() call share; rows with equal settings may be batched."""

    chat: bool
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    group: int | None = None  # seeded sampling: the request's own batch, so that its seed reproduces


@dataclass
class Row:
    prompt: str | list[dict]  # a raw prompt (completions) or a conversation (chat)
    route_text: str  # what the router sees: the raw prompt, or the last user message
    edit: bool  # False: the base model for this row (its neuron vector is zero)
    settings: Settings
    sink: Sink
    ticket: "_Ticket | None" = field(default=None, repr=False)


@dataclass
class _Ticket:
    """One request's rows not yet taken by the worker; the request waits while any are left."""

    left: int


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in `text`, None if none is there."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class RowText:
    """One row's answer as its tokens arrive: decoded whole each time (so multi-token characters
    come out right) and sent on only once it can no longer change, so the deltas join to exactly
    the final text (stripped like generate()'s answers, cut before a stop string)."""

    def __init__(self, row: Row, tokenizer, ends: set[int], label: dict) -> None:
        self.row, self.tokenizer, self.ends, self.label = row, tokenizer, ends, label
        self.tokens: list[int] = []
        self.sent, self.stopped = "", False

    def add(self, token: int) -> None:
        if self.stopped:
            return
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

    def finish(self, answer: str) -> None:
        """Send what is left of generate()'s answer, then the row's end."""
        cut = stop_at(answer, self.row.settings.stop)
        text = answer if cut is None else answer[:cut].rstrip()
        self._send(text)
        hit_limit = not self.stopped and cut is None and len(self.tokens) >= self.row.settings.max_tokens
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


class RowStreamer(BaseStreamer):
    """Hands each batch row's new token to its RowText as generate() makes it."""

    def __init__(self, rows: list[RowText]) -> None:
        self.rows, self.started = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # generate() shows the prompts first: the rows have passed every check
            self.started = True
            for r in self.rows:
                r.row.sink(("start", r.label))
            return
        for r, token in zip(self.rows, value.reshape(-1).tolist()):
            r.add(token)

    def end(self) -> None:
        pass


BASE_LABEL = {"edit_fired": False, "edit_id": None, "distance": None}


class Batcher:
    """The queue and the worker thread that owns the model (see the module docstring)."""

    def __init__(self, edited, *, max_batch: int = 8, max_queue: int = 64, wait_s: float = 0.005) -> None:
        self.edited, self.max_batch, self.max_queue, self.wait_s = edited, max_batch, max_queue, wait_s
        self.stats = {"requests": 0, "rejected": 0, "batches": 0, "rows": 0, "largest_batch": 0}
        self._rows: list[Row] = []
        self._waiting = 0  # requests with rows not yet taken
        self._cond = threading.Condition()
        self._closed = False
        self._groups = itertools.count()
        self._ends = {False: set(edited.answer_end_ids()), True: set(edited.end_of_turn_ids())}
        self._thread = threading.Thread(target=self._loop, name="megedit-serve-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def new_group(self) -> int:
        return next(self._groups)

    def submit(self, rows: list[Row]) -> None:
        """Queue one request's rows, or raise QueueFull at once when `max_queue` requests wait."""
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._waiting >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{self._waiting} requests are waiting (the limit is {self.max_queue}); retry later")
            ticket = _Ticket(len(rows))
            for row in rows:
                row.ticket = ticket
            self._rows += rows
            self._waiting += 1
            self.stats["requests"] += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the worker once its batch is done; rows still queued get an error, not silence."""
        with self._cond:
            self._closed, left, self._rows = True, self._rows, []
            self._cond.notify_all()
        for row in left:
            row.sink(("error", QueueFull("the server is shutting down")))

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as error:  # the worker must outlive any one batch
                log.exception("serve: a batch of %d rows failed", len(batch))
                for row in batch:
                    row.sink(("error", error))

    def _next_batch(self) -> list[Row] | None:
        """The oldest row and the queued rows with its settings; waits `wait_s` for more when short."""
        with self._cond:
            while not self._rows and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._rows[0].settings
            deadline = time.monotonic() + self.wait_s
            while sum(r.settings == key for r in self._rows) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [r for r in self._rows if r.settings == key][: self.max_batch]
            taken = set(map(id, batch))
            self._rows = [r for r in self._rows if id(r) not in taken]
            for row in batch:
                row.ticket.left -= 1
                if row.ticket.left == 0:  # the request's last row is taken: it no longer waits
                    self._waiting -= 1
            return batch

    def _run(self, rows: list[Row]) -> None:
        """Answer `rows` as one batch; when a row is refused (a prompt too long, a chat the
        template cannot render), answer each row alone so only that row fails."""
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        try:
            self._answer(rows)
        except MeGError as error:
            if len(rows) == 1:
                rows[0].sink(("error", error))
                return
            for row in rows:
                self._run([row])

    def _answer(self, rows: list[Row]) -> None:
        vectors, labels = self._route(rows)
        tokenizer = self.edited.tokenizer
        texts = [RowText(r, tokenizer, self._ends[r.settings.chat], label) for r, label in zip(rows, labels)]
        answers = self._generate(rows, vectors, RowStreamer(texts))
        for text, answer in zip(texts, answers):
            text.finish(answer)

    def _route(self, rows: list[Row]) -> tuple[torch.Tensor, list[dict]]:
        """Each row's neuron vector and its `megedit` label; base-model rows keep the zero vector."""
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
        return vectors, labels

    def _generate(self, rows: list[Row], vectors: torch.Tensor, streamer: RowStreamer) -> list[str]:
        s = rows[0].settings
        kwargs: dict = {"vectors": vectors, "streamer": streamer, "max_prompt_tokens": self._prompt_limit(s)}
        if s.temperature > 0:  # OpenAI's sampling knobs only: no top-k from the model's generation config
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0, seed=s.seed)
        if s.stop:
            kwargs["stop_strings"] = list(s.stop)
        prompts = [r.prompt for r in rows]
        if s.chat:
            return self.edited.chat(prompts, s.max_tokens, **kwargs)
        return self.edited.generate(prompts, s.max_tokens, batch_size=len(rows), **kwargs)

    def _prompt_limit(self, s: Settings) -> int | None:
        """Prompts must leave room for max_tokens new tokens in the model's context."""
        context, own = context_length(self.edited.model), self.edited.max_prompt_tokens
        limits = [x for x in (own, None if context is None else max(1, context - s.max_tokens)) if x is not None]
        return min(limits) if limits else None
