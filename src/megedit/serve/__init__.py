"""`megedit serve`: an OpenAI-compatible HTTP server for an edit pack (the optional extra
`megedit[serve]`: FastAPI and uvicorn). Importing this package needs neither; `create_app` does."""

from __future__ import annotations

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


__all__ = ["create_app", "require_extra", "EXTRA_HINT"]
