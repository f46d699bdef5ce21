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
# how long an idle client connection stays open (uvicorn's default is 5 s): on a CPU an answer under
# load takes several seconds, and a pooled connection the server closes just as a client reuses it
# fails that request (seen as 3 connection errors in 500 requests of bench/serve_load.py)
KEEP_ALIVE_S = 75


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


@contextmanager
def in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` under uvicorn on a free port of `host` in a background thread (a notebook, a test,
    a benchmark); yields the server's root URL, and stops the server on leaving."""
    require_extra()
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S))
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


__all__ = ["create_app", "in_thread", "require_extra", "EXTRA_HINT"]
