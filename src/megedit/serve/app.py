"""The OpenAI-compatible HTTP API over an EditedModel: /healthz, /v1/models, /v1/completions and
/v1/chat/completions (streamed as server-sent events or not). Two model ids: the edited model and
the same id + "-base", the base model (its neuron vector zero), for side-by-side checks. Every
choice carries a `megedit` object (did an edit fire, which one) and the response an
`X-Megedit-Edit` header. The model itself is driven by the Batcher's one worker thread."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import MeGError
from ..lm import context_length
from .batcher import Batcher, QueueFull, Row, Settings

DEFAULT_MAX_TOKENS = {False: 16, True: 256}  # completions: OpenAI's default; chat: a reply's room
MAX_STOPS = 4  # as OpenAI


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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False


class CompletionBody(_Body):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# -- the app --------------------------------------------------------------------------------------


def create_app(edited, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               model_id: str | None = None) -> "FastAPI":
    """The API over `edited`. `api_key`: requests to /v1 must send `Authorization: Bearer KEY`.
    The batcher (its queue and worker thread) is `app.state.batcher`."""
    model_id = model_id or "megedit/edited"
    batcher = Batcher(edited, max_batch=max_batch, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="megedit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.model_ids = batcher, {model_id: True, f"{model_id}-base": False}
    app.state.context, app.state.created = context_length(edited.model), int(time.time())
    _error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": model_id, "waiting": batcher.waiting, **batcher.stats}

    app.include_router(_v1(app, api_key))
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
            why = first.get("ctx", {}).get("error")
            return APIError(400, f"the request body is not valid JSON ({why})").response()
        where = ".".join(str(p) for p in first.get("loc", ())[1:])  # past "body"
        message = first.get("msg", "invalid request")
        return APIError(400, f"{where}: {message}" if where else message, param=where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None
                        ).response()


def _v1(app: FastAPI, api_key: str | None) -> APIRouter:
    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": app.state.created,
                                            "owned_by": "megedit"} for name in app.state.model_ids]}

    @v1.post("/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        return await _answer(app, body, [(p, p) for p in prompts], chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatBody):
        # OpenAI's newer "developer" role is the system role of chat templates
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
                    for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, f"messages: the conversation must end with a user message, found "
                                f"{messages[-1]['role']!r}", param="messages")
        return await _answer(app, body, [(messages, messages[-1]["content"])], chat=True)

    return v1


def _text(message: Message) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in message.content):
        raise APIError(400, "messages: only text content is supported", param="messages")
    return "".join(part["text"] for part in message.content)


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
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings, found {len(stops)}", param="stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:  # greedy: top_p and seed change nothing, so such requests share batches
        return Settings(chat, limit, stop=stops)
    seed = body.seed
    group = app.state.batcher.new_group() if seed is not None else None
    return Settings(chat, limit, temperature, 1.0 if body.top_p is None else body.top_p, stops, seed, group)


async def _answer(app: FastAPI, body: _Body, prompts: list[tuple], chat: bool):
    """Queue the request's rows (prompt, router text) and answer, streamed or not."""
    if body.model not in app.state.model_ids:
        raise APIError(404, f"model {body.model!r} does not exist here; this server has "
                            f"{', '.join(app.state.model_ids)}", param="model", code="model_not_found")
    settings = _settings(app, body, chat)
    pending = _Pending(len(prompts))
    rows = [Row(prompt, text, app.state.model_ids[body.model], settings, pending.sink(i))
            for i, (prompt, text) in enumerate(prompts)]
    try:
        app.state.batcher.submit(rows)
    except QueueFull as error:
        raise _api_error(error) from None
    reply = _Reply(chat, body.model)
    if body.stream:
        labels, early = await pending.started()
        return StreamingResponse(_events(pending, reply, labels, early), media_type="text/event-stream",
                                 headers={"X-Megedit-Edit": _header(labels), "Cache-Control": "no-cache"})
    labels, results = await pending.finished()
    return JSONResponse(reply.whole(labels, results), headers={"X-Megedit-Edit": _header(labels)})


def _header(labels: list[dict]) -> str:
    """Per choice: the edit's id, "none" where no edit fired, "unnamed" where one fired that the
    router cannot name (an entropy router)."""
    return ",".join(("unnamed" if x["edit_id"] is None else x["edit_id"]) if x["edit_fired"] else "none"
                    for x in labels)


def _api_error(error: BaseException) -> APIError:
    if isinstance(error, MeGError):  # the request asked for something the model cannot do
        return APIError(400, str(error))
    if isinstance(error, QueueFull):
        return APIError(503, f"server busy: {error}", kind="server_error", code="queue_full")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error")


class _Pending:
    """One request's rows as the worker answers them: its events land on this event loop."""

    def __init__(self, n: int) -> None:
        self.n, self.loop, self.events = n, asyncio.get_running_loop(), asyncio.Queue()

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
                raise _api_error(data)
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
            error = _api_error(data)
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
