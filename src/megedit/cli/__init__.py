"""The `megedit` command: one verb per job, each a thin call into the library.

Verbs are listed in the order a user meets them: demo, fit, add, remove, generate, eval, serve,
inspect, config, then the stage verbs (fit-neurons, sweep-layers, fit-router). Global flags (--quiet,
--debug) go before or after the verb; every verb that loads a model takes --model, --device and
--dtype.
"""

from __future__ import annotations

import logging
import os
import sys

from . import eval as eval_verbs
from . import living, meg, serve, stages
from .common import Formatter, Parser, global_flags

VERBS = (meg.add_demo, meg.add_fit, living.add_add, living.add_remove, meg.add_generate, eval_verbs.add_eval,
         serve.add_serve, meg.add_inspect, meg.add_config, stages.add_fit_neurons, stages.add_sweep_layers,
         stages.add_fit_router)


def version() -> str:
    """The installed distribution's version, else the package's own (a source checkout)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("megedit")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> Parser:
    parser = Parser(prog="megedit", formatter_class=Formatter,
                    description="Massive knowledge editing of language models with MeG (generated dynamic neurons).",
                    epilog="`megedit VERB --help` shows a verb's options.")
    parser.add_argument("--version", action="version", version=f"megedit {version()}")
    global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.progress = not args.quiet and sys.stderr.isatty()
    _configure_output(args)
    from ..errors import MeGError

    try:
        _join_launcher(args)
        return args.run(args)
    except MeGError as error:
        if args.debug:
            raise
        print(f"megedit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megedit: interrupted", file=sys.stderr)
        return 130


GROUP_VERBS = ("fit", "fit-neurons", "eval")  # the verbs whose work the ranks of a launcher share


def _join_launcher(args) -> None:
    """Under torchrun or accelerate launch (WORLD_SIZE > 1), a verb that shares its work joins the group once
    its model is loaded (common.load_lm), and only rank 0 shows progress; the others are refused in one line."""
    from ..errors import ConfigError
    from ..parallel import launched

    world = launched()
    if world <= 1:
        return
    if args.verb not in GROUP_VERBS:
        raise ConfigError(f"megedit {args.verb} runs in one process; start it without a launcher (WORLD_SIZE={world}; "
                          f"{', '.join(GROUP_VERBS)} share their work between ranks)")
    args.progress = args.progress and os.environ.get("RANK", "0") == "0"


def _configure_output(args) -> None:
    """The CLI, not the library, decides what reaches the terminal."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("megedit").setLevel(level)
    _quiet_transformers()


def _quiet_transformers() -> None:
    """The library's own loading bars and notices drown the CLI's output."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
