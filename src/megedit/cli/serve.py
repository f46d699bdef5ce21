"""`megedit serve`: the OpenAI-compatible HTTP server over an edit pack (docs/serving.md)."""

from __future__ import annotations

import ipaddress
import logging
import os
from argparse import ArgumentTypeError
from pathlib import Path

from .common import add_model_args, add_verb, load_pack
from .types import positive_int

log = logging.getLogger("megedit")

KEY_ENV = "MEGEDIT_API_KEY"


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise ArgumentTypeError(f"expected a port number from 0 to 65535, found {text!r}")
    return value


def add_serve(sub) -> None:
    p = add_verb(sub, "serve", "serve an edit pack over an OpenAI-compatible HTTP API (extra: megedit[serve])",
                 "Serve the edited model (id megedit/<pack folder>) and the base model beside it (the same id + "
                 "'-base') at /v1/completions and /v1/chat/completions, OpenAI's API: any OpenAI client works. "
                 "Each choice says whether an edit fired. Concurrent requests decode together on one worker "
                 "(continuous batching); a full queue answers 503. Binding a host other than loopback needs an API "
                 f"key (--api-key or ${KEY_ENV}).")
    p.add_argument("pack", type=Path, help="edit pack folder")
    add_model_args(p, None, pack=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless an API key is set)")
    p.add_argument("--port", type=port, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${KEY_ENV}, which keeps it out of ps)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most rows decoding together")
    p.add_argument("--max-batch-tokens", type=positive_int, default=65536,
                   help="most rows decoding together times the longest one's tokens (prompt + max_tokens)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="most prompts waiting; a request that does not fit is answered 503 at once")
    p.add_argument("--max-queue-tokens", type=positive_int, default=65536,
                   help="most tokens waiting (each prompt's tokens + its max_tokens); more: 503")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=2048,
                   help="longest prompt, in tokens (also below the model's context less max_tokens)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body; more: 413")
    p.add_argument("--max-connections", type=positive_int, default=128,
                   help="most open connections and requests in flight; more are answered 503")
    p.set_defaults(run=run_serve)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def run_serve(args) -> int:
    from ..errors import ConfigError
    from ..serve import create_app, require_extra, uvicorn_config

    key = args.api_key or os.environ.get(KEY_ENV) or None
    if key is None and not is_loopback(args.host):  # checked before the model loads
        raise ConfigError(f"--host {args.host} is reachable from other machines: set an API key (--api-key or "
                          f"${KEY_ENV}), or serve on 127.0.0.1")
    require_extra()
    import uvicorn

    edited = load_pack(args)
    model_id = f"megedit/{args.pack.resolve().name}"
    app = create_app(edited, api_key=key, max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens,
                     max_queue=args.max_queue, max_queue_tokens=args.max_queue_tokens,
                     max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes, model_id=model_id)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log.info("serving %s and %s-base at http://%s:%d/v1%s", model_id, model_id, shown, args.port,
             " (API key required)" if key else "")
    uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port, max_connections=args.max_connections,
                                  log_level="warning" if args.quiet else "info")).run()
    return 0
