"""What stands between the network and the API: a pure ASGI middleware that gives every request an
id, checks the Host header (on a server without a key) and the API key before a byte of the body is
read, reads the body only up to a size limit and a time limit, and turns any unexpected exception
into a 500 that says "internal error" and the request id (the detail goes to the log); and the
uvicorn settings that bound connections: a deadline for each request's headers, an idle timeout,
a header size limit and a connection limit."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt list at the queue's token limit fits many times over
BODY_TIMEOUT_S = 30.0  # from the end of the headers to the end of the body
HEADER_TIMEOUT_S = 10.0  # from a connection's opening (or a request's first byte) to its whole headers
KEEP_ALIVE_S = 15.0  # an idle connection's life: above the 5 s after which httpx (the openai client) drops its own
MAX_HEADER_BYTES = 16 * 1024  # h11's default, said out loud
MAX_CONNECTIONS = 128  # open connections (and requests in flight); more get uvicorn's 503


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class Guard:
    """The ASGI middleware (see the module docstring). `api_key` None: the Host header must name
    the loopback (any port: a tunnel may change it), which a DNS-rebinding page cannot send."""

    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def tagged(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None:
            body, refusal = await self._body(scope, receive)
        if refusal is not None:
            return await _refuse(tagged, *refusal)
        try:
            await self.app(scope, _replay(body, receive), tagged)
        except Exception as error:
            log.error("serve: request %s: %s: %s", rid, type(error).__name__, error, exc_info=error)
            if not started:
                await _refuse(tagged, 500, f"internal error (request id {rid})")

    def _refusal(self, scope) -> tuple | None:
        """(status, message, code) for a request refused on its headers alone, else None."""
        headers = dict(scope["headers"])
        if self.api_key is None and not _loopback_host(headers.get(b"host", b"").decode("latin-1")):
            return 400, "the Host header must name the loopback (localhost, 127.0.0.1 or [::1]) on a server " \
                        "without an API key", "invalid_host"
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return 400, "the Content-Length header is not a number", None
        if int(length) > self.max_body_bytes:
            return 413, f"the request body is {int(length)} bytes; the limit is {self.max_body_bytes}", "body_too_large"
        return None

    async def _body(self, scope, receive) -> tuple[bytes, tuple | None]:
        """The whole body, read within the size and time limits, or (b"", the refusal)."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return b"", (408, f"the request body did not arrive within {self.body_timeout_s:g} s", None)
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away", None)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return b"", (413, f"the request body is over the limit of {self.max_body_bytes} bytes",
                             "body_too_large")
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _loopback_host(host: str) -> bool:
    """Whether a Host header names the loopback, with or without a port."""
    host = host.lower()
    return any(host == name or (host.startswith(f"{name}:") and host[len(name) + 1:].isdigit())
               for name in LOOPBACK_NAMES)


def _replay(body: bytes, receive):
    """A receive() that gives the body already read, then the connection's own events (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, status: int, message: str, code: str | None = None) -> None:
    """An error in OpenAI's shape; the connection then closes, so an unread body is never read."""
    body = error_body(status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that opens
    (or, between requests, starts sending) and does not finish a request's headers within
    `header_timeout_s` is closed. uvicorn itself only times out idle connections."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._armed_for:
            self._disarm()  # a request began: its body and answer have their own limits

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.cycle is self._armed_for and not self.transport.is_closing():
            log.debug("serve: closing a connection that sent no whole request in %g s", self.header_timeout_s)
            self.transport.close()


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout_s: float = HEADER_TIMEOUT_S,
                   keep_alive_s: float = KEEP_ALIVE_S, max_connections: int = MAX_CONNECTIONS, **kwargs):
    """uvicorn's Config for the app with the connection limits above; `kwargs` go to Config."""
    import uvicorn

    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=keep_alive_s,
                          limit_concurrency=max_connections, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          **kwargs)
