"""`megedit serve`: an OpenAI-compatible HTTP server for an edit pack (the optional extra
`megedit[serve]`: FastAPI and uvicorn). Importing this package needs neither; `create_app` does."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from ..errors import MeGError

EXTRA_HINT = "pip install 'megedit[serve]'"


def require_extra() -> None:
    """Fail in one line, naming the install command, when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise MeGError(f"serving needs FastAPI and uvicorn ({error.name or error} is not installed): "
                       f"{EXTRA_HINT}") from None


def create_app(edited, **kwargs):
    """The FastAPI app over an EditedModel; see `megedit.serve.app.create_app`."""
    require_extra()
    from .app import create_app as create

    return create(edited, **kwargs)


def uvicorn_config(app, **kwargs):
    """uvicorn's Config for `app` with the server's connection limits (`megedit.serve.guard`)."""
    require_extra()
    from .guard import uvicorn_config as config

    return config(app, **kwargs)


@contextmanager
def in_thread(app, host: str = "127.0.0.1", **kwargs) -> Iterator[str]:
    """Run `app` under uvicorn on a free port of `host` in a background thread (a notebook, a test,
    a benchmark); yields the server's root URL, and stops the server on leaving. `kwargs`: the
    limits of `uvicorn_config` (header_timeout_s, keep_alive_s, max_connections)."""
    require_extra()
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", **kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise MeGError(f"the server did not start on {host}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


__all__ = ["create_app", "in_thread", "uvicorn_config", "require_extra", "EXTRA_HINT"]
