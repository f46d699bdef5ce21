"""The OpenAI-compatible HTTP API over an EditedModel: /healthz, /v1/models, /v1/completions and
/v1/chat/completions (streamed as server-sent events or not). Two model ids: the edited model and
the same id + "-base", the base model (its neuron vector zero), for side-by-side checks. Every
choice carries a `megedit` object (did an edit fire, which one) and the response an
`X-Megedit-Edit` header. The model itself is driven by the Batcher's one worker thread.

Requests are checked here, before they reach the model: strict types (no coercion), known chat
roles, non-empty prompts that are valid Unicode and fit the context, bounded stop strings and
prompt counts. Every refusal is a 4xx with a one-line message; anything unexpected is a 500 that
says "internal error" and the request id, with the detail in the log (guard.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import MeGError
from ..lm import check_prompt_lengths, context_length
from ..runtime.conversation import chat_prompt_ids, conversation
from .batcher import Batcher, QueueFull, Row, Settings
from .guard import BODY_TIMEOUT_S, MAX_BODY_BYTES, Guard

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = {False: 16, True: 256}  # completions: OpenAI's default; chat: a reply's room
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # a stop string is matched against the text at every token
MAX_PROMPTS = 64  # prompts in one completions request (and never more than the queue holds)
MAX_PROMPT_TOKENS = 2048  # the server's default: a longer prompt holds the worker for seconds
GREEDY_BELOW = 1e-4  # a temperature this small is greedy decoding (dividing logits by it overflows)
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        retry = {"Retry-After": "1"} if self.status == 503 else None  # busy: worth a retry soon
        return JSONResponse(body, status_code=self.status, headers=retry)


# -- request bodies (fields OpenAI defines that are not listed here are ignored) ----------------


class _Strict(BaseModel):
    # no coercion: "max_tokens": true, "stream": "yes", "temperature": "0.5" are refused; NaN too
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Body(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # what torch's generators take
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: int | None = None
    stream: bool | None = False


class CompletionBody(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for system
    content: str | list[TextPart]


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# -- the app --------------------------------------------------------------------------------------


def create_app(edited, *, api_key: str | None = None, max_batch: int = 32, max_batch_tokens: int = 65536,
               max_queue: int = 64, max_queue_tokens: int = 65536, max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               model_id: str | None = None) -> "FastAPI":
    """The API over `edited`. `api_key`: requests to /v1 must send `Authorization: Bearer KEY`
    (checked before the body is read); without one, the Host header must name the loopback.
    At most `max_batch` rows decode together, their number times the longest one's prompt +
    max_tokens at most `max_batch_tokens`. The queue holds at most `max_queue` prompts and
    `max_queue_tokens` tokens (prompt + max_tokens); `max_prompt_tokens` bounds one prompt
    (None: the model's context); a body must be at most `max_body_bytes` long and arrive within
    `body_timeout_s`. The batcher (its queue and worker thread) is `app.state.batcher`."""
    model_id = model_id or "megedit/edited"
    batcher = Batcher(edited, max_batch=max_batch, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                      max_queue_tokens=max_queue_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="megedit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.model_ids = batcher, {model_id: True, f"{model_id}-base": False}
    app.state.edited, app.state.max_prompt_tokens = edited, max_prompt_tokens
    app.state.context, app.state.created = context_length(edited.model), int(time.time())
    _error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting,
                "waiting_tokens": batcher.waiting_tokens, "active": batcher.active, **batcher.stats}

    app.include_router(_v1(app))
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's JSON shape, whatever raised it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            why = str(first.get("ctx", {}).get("error", "")).splitlines()[0][:200]
            return APIError(400, f"the request body is not valid JSON ({why})").response()
        where = _where(first.get("loc", ()))
        message = str(first.get("msg", "invalid request")).splitlines()[0][:200]
        return APIError(400, f"{where}: {message}" if where else message, param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None
                        ).response()


def _where(loc) -> str:
    """A validation error's field path, past "body" and without pydantic's union branch names
    (such as "str" or "list[str]")."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_NAMES)]
    return ".".join(parts)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "Message"}


def _v1(app: FastAPI) -> APIRouter:
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": app.state.created,
                                            "owned_by": "megedit"} for name in app.state.model_ids]}

    @v1.post("/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        for i, prompt in enumerate(prompts):
            _check_text(prompt, "prompt" if isinstance(body.prompt, str) else f"prompt.{i}")
        return await _answer(app, request, body, [(p, p) for p in prompts], chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
                    for m in body.messages]
        for i, m in enumerate(messages):
            _check_text(m["content"], f"messages.{i}.content", empty_ok=i < len(messages) - 1)
        if messages[-1]["role"] != "user":
            raise APIError(400, f"messages: the conversation must end with a user message, found "
                                f"{messages[-1]['role']!r}", param="messages")
        return await _answer(app, request, body, [(messages, messages[-1]["content"])], chat=True)

    return v1


def _text(message: Message) -> str:
    """A message's text: a string, or its text parts joined."""
    return message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)


def _check_text(text: str, param: str, empty_ok: bool = False) -> None:
    """Refuse empty text and text that is not valid Unicode (a lone surrogate, which JSON's
    \\ud800 escapes can carry and no tokenizer can encode)."""
    if not text and not empty_ok:
        raise APIError(400, f"{param}: must not be empty", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(400, f"{param}: not valid Unicode (a lone surrogate at character {error.start})",
                       param=param) from None


def _settings(app: FastAPI, body: _Body, chat: bool) -> Settings:
    """The generation settings of a request, checked; OpenAI's defaults where it gives none."""
    if body.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported, found {body.n}", param="n")
    context = app.state.context
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is None:
        limit = DEFAULT_MAX_TOKENS[chat] if context is None else min(DEFAULT_MAX_TOKENS[chat], context // 2)
    if context is not None and limit >= context:
        raise APIError(400, f"max_tokens: must be below the model's context of {context} tokens, found {limit}",
                       param="max_tokens")
    stops = tuple(s for s in ((body.stop,) if isinstance(body.stop, str) else body.stop or ()) if s)
    for s in stops:
        _check_text(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise APIError(400, f"stop: a stop string may be {MAX_STOP_CHARS} characters long, found {len(s)}",
                           param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:  # greedy: top_p and seed change nothing
        return Settings(chat, limit, stop=stops)
    return Settings(chat, limit, temperature, 1.0 if body.top_p is None else body.top_p, stops, body.seed)


def _encode(app: FastAPI, prompt, chat: bool, settings: Settings, param: str) -> list[int]:
    """A prompt's tokens as the model will see them (the pack's prompt format, or the chat
    template); refused when empty or too long to leave room for max_tokens."""
    edited = app.state.edited
    if chat:  # with the pack's system message, as EditedModel.chat adds it
        ids = chat_prompt_ids(edited.tokenizer, conversation(prompt, edited.prompt_format))
    else:
        ids = edited.prompt_format.prompt_ids(prompt, edited.tokenizer)
    if not ids:
        raise APIError(400, f"{param}: encodes to no tokens", param=param)
    context = app.state.context
    limits = [x for x in (app.state.max_prompt_tokens, edited.max_prompt_tokens,
                          None if context is None else context - settings.max_tokens) if x is not None]
    check_prompt_lengths([ids], min(limits) if limits else None, [param])
    return ids


async def _answer(app: FastAPI, request: Request, body: _Body, prompts: list[tuple], chat: bool):
    """Queue the request's rows (prompt, router text) and answer, streamed or not; the rows are
    cancelled when the client goes away or the request fails."""
    if body.model not in app.state.model_ids:
        raise APIError(404, f"model {body.model!r} does not exist here; this server has "
                            f"{', '.join(app.state.model_ids)}", param="model", code="model_not_found")
    settings = _settings(app, body, chat)
    rid = request.state.request_id
    try:
        names = ["messages" if chat else "prompt" if len(prompts) == 1 else f"prompt.{i}" for i in range(len(prompts))]
        ids = [_encode(app, p, chat, settings, name) for (p, _), name in zip(prompts, names)]
    except MeGError as error:  # a chat template that fails, a prompt too long
        raise APIError(400, str(error)) from None
    pending = _Pending(len(prompts), rid)
    rows = [Row(ids[i], text, app.state.model_ids[body.model], settings, pending.sink(i), rid)
            for i, (_, text) in enumerate(prompts)]
    try:
        ticket = app.state.batcher.submit(rows)
    except (QueueFull, MeGError) as error:
        raise _api_error(error, rid) from None
    cancel, streaming = (lambda: app.state.batcher.cancel(ticket)), False
    try:
        if body.stream:
            labels, early = await _unless_gone(request, pending.started())
            streaming = True  # from here the stream cancels the rows when it ends, however it ends
            return _Stream(_events(pending, _Reply(chat, body.model), labels, early), cancel,
                           headers={"X-Megedit-Edit": _header(labels), "Cache-Control": "no-cache"})
        labels, results = await _unless_gone(request, pending.finished())
        return JSONResponse(_Reply(chat, body.model).whole(labels, results),
                            headers={"X-Megedit-Edit": _header(labels)})
    except _Gone:
        log.info("serve: request %s: the client went away; its rows are cancelled", rid)
        return Response(status_code=499)
    finally:
        if not streaming:  # answered, failed or gone: rows still queued or decoding are of no use now
            cancel()


class _Stream(StreamingResponse):
    """Server-sent events that cancel the request's rows when the stream ends (a client that
    disconnects included)."""

    def __init__(self, events, on_close, headers: dict) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Gone(Exception):
    """The client disconnected while its request waited."""


async def _unless_gone(request: Request, waiting):
    """Await `waiting`, checking now and then that the client is still connected."""
    task = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _Gone
    finally:
        task.cancel()


def _header(labels: list[dict]) -> str:
    """Per choice: the edit's id, "none" where no edit fired, "unnamed" where one fired that the
    router cannot name (an entropy router)."""
    return ",".join(("unnamed" if x["edit_id"] is None else x["edit_id"]) if x["edit_fired"] else "none"
                    for x in labels)


def _api_error(error: BaseException, request_id: str) -> APIError:
    """A worker's error as the client sees it; an unexpected one says no more than its request id
    (the worker logged the detail under that id)."""
    if isinstance(error, MeGError):  # the request asked for something the model cannot do
        return APIError(400, str(error).splitlines()[0])
    if isinstance(error, QueueFull):
        return APIError(503, f"server busy: {error}", kind="server_error", code="queue_full")
    return APIError(500, f"internal error (request id {request_id})", kind="server_error")


class _Pending:
    """One request's rows as the worker answers them: its events land on this event loop."""

    def __init__(self, n: int, request_id: str) -> None:
        self.n, self.request_id = n, request_id
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()

    def sink(self, i: int):
        def put(event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (i, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return put

    async def started(self) -> tuple[list[dict], list]:
        """Each row's label, once every row has started; the events that came meanwhile."""
        labels, early = [None] * self.n, []
        await self._until_each("start", labels, early)
        return labels, early

    async def finished(self) -> tuple[list[dict], list[dict]]:
        labels, early = await self.started()
        results = [None] * self.n
        for i, (kind, data) in early:
            results[i] = data if kind == "done" else results[i]
        await self._until_each("done", results)
        return labels, results

    async def _until_each(self, kind: str, found: list, other: list | None = None) -> None:
        """Take events until every row has one of `kind` (its data goes to found[i]); an error
        raises; events of other kinds go to `other` when given."""
        while any(x is None for x in found):
            i, (event, data) = await self.events.get()
            if event == "error":
                raise _api_error(data, self.request_id)
            if event == kind:
                found[i] = data
            elif other is not None:
                other.append((i, (event, data)))


async def _events(pending: _Pending, reply: "_Reply", labels: list[dict], early: list) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text, a last chunk per choice with its
    finish_reason, then [DONE]; an error after the headers went out comes as an error event."""
    if reply.chat:
        for i, label in enumerate(labels):
            yield _sse(reply.chunk(i, label, {"role": "assistant", "content": ""}))
    left, queued = pending.n, list(early)
    while left:
        i, (kind, data) = queued.pop(0) if queued else await pending.events.get()
        if kind == "error":
            error = _api_error(data, pending.request_id)
            yield _sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": error.code}})
            break
        if kind == "delta":
            yield _sse(reply.chunk(i, labels[i], {"content": data} if reply.chat else data))
        elif kind == "done":
            left -= 1
            yield _sse(reply.chunk(i, labels[i], {} if reply.chat else "", data["finish_reason"]))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Reply:
    """OpenAI's response objects for one request: whole, or chunk by chunk."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, labels: list[dict], results: list[dict]) -> dict:
        choices = []
        for i, (label, result) in enumerate(zip(labels, results)):
            body = ({"message": {"role": "assistant", "content": result["text"]}} if self.chat
                    else {"text": result["text"]})
            choices.append({"index": i, **body, "finish_reason": result["finish_reason"], "logprobs": None,
                            "megedit": label})
        return {**self._head(False), "choices": choices}

    def chunk(self, i: int, label: dict, piece, finish: str | None = None) -> dict:
        body = {"delta": piece} if self.chat else {"text": piece}
        choice = {"index": i, **body, "finish_reason": finish, "logprobs": None, "megedit": label}
        return {**self._head(True), "choices": [choice]}
