"""What the verbs share: the parser classes, the global flags, the data and model options and
their loading. Heavy imports (torch, transformers) happen inside the loaders, never at parse time."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .types import device, dtype, positive_int

log = logging.getLogger("megedit")

HALF = ("bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (`megedit VERB --help` shows the usage).
    Option groups built from the config classes are `defer`red: they import torch, which a usage
    error or `megedit --help` should not wait for, so a verb builds them only when it is used."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list = []

    def defer(self, build) -> None:
        self._deferred.append(build)

    def _complete(self) -> None:
        while self._deferred:
            self._deferred.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except the empty ones (None, off) that would only add noise."""

    def _get_help_string(self, action) -> str:
        if action.default is None or action.default is False or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


def global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """--quiet and --debug, before the verb (`top`) and after it. After it their default is
    SUPPRESS, so a verb that does not see them leaves what the top level parsed untouched."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("--quiet", action="store_true", default=default,
                        help="no progress bars or log lines (warnings and errors still show)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug log lines, and the full traceback on errors")


_VERB_FLAGS = argparse.ArgumentParser(add_help=False)
global_flags(_VERB_FLAGS, top=False)


def add_verb(sub, name: str, summary: str, description: str) -> Parser:
    """A verb's parser: the global flags, defaults shown in its help."""
    return sub.add_parser(name, help=summary, description=description, formatter_class=Formatter,
                          parents=[_VERB_FLAGS])


# -- data ---------------------------------------------------------------------------------------


def add_data_args(p, limit_help: str = "use the first N records", formats: bool = True) -> None:
    p.add_argument("--data", required=True, metavar="KIND:PATH",
                   help="edit data, e.g. counterfact:../shared/data/counterfact/counterfact-edit.json")
    p.add_argument("--limit", type=positive_int, default=None, help=limit_help)
    p.add_argument("--offset", type=int, default=0, help="skip this many records first")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out malformed records (with a warning) instead of stopping")
    if formats:
        p.add_argument("--format", dest="prompt_format", choices=("raw", "qa", "chat"), default=None,
                       help="prompt wrapping (default: raw for CounterFact, qa for ZsRE)")


def add_pool_arg(p) -> None:
    p.add_argument("--pseudo", metavar="KIND:PATH", default=None,
                   help="pseudo-edit pool (default: the records of --data after the edited ones)")


def add_processes_arg(p, work: str = "fit stage A") -> None:
    p.add_argument("--processes", type=positive_int, default=1, metavar="N",
                   help=f"{work} in N forked one-thread processes side by side (CPU, Linux; e.g. one "
                        "per core)")


def load_data(args):
    """(kind, path, requests, prompt format) of --data."""
    from ..data import load_requests, parse_data_arg
    from ..data.prompts import DEFAULT_FOR_KIND, get_format

    kind, path = parse_data_arg(args.data)
    requests = load_requests(kind, path, limit=args.limit, offset=args.offset, skip_invalid=args.skip_invalid)
    return kind, path, requests, get_format(getattr(args, "prompt_format", None) or DEFAULT_FOR_KIND[kind])


def load_pool(args, kind: str, path: Path, option: str = "pseudo"):
    """A pool of other records: the file of --pseudo (or `option`), else the records of --data after
    the edited ones, else none (("none", []): the library's fallback pool then serves)."""
    from ..data import count_records, load_requests, parse_data_arg

    if getattr(args, option, None):
        pool_kind, pool_path = parse_data_arg(getattr(args, option))
        return f"{pool_kind}:{pool_path.name}", load_requests(pool_kind, pool_path, skip_invalid=args.skip_invalid)
    if args.limit is None or args.offset + args.limit >= count_records(kind, path):  # no record follows the edits
        return "none", []
    start = args.offset + args.limit
    return f"{kind}:{path.name} records {start}..", load_requests(kind, path, offset=start, skip_invalid=args.skip_invalid)


# -- models -------------------------------------------------------------------------------------


def add_model_args(p, model_default: str | None = "smollm2", pack: bool = False) -> None:
    """--model, --device, --dtype: every verb that loads a language model takes them."""
    p.add_argument("--model", default=model_default,
                   help="base model (default: the one the pack names)" if pack and model_default is None else
                   "'smollm2' or 'gemma3-270m' (embedded), a local folder or a hub id")
    p.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                   help="cpu, cuda, cuda:N, mps or auto (a GPU when there is one, else the CPU)")
    p.add_argument("--dtype", type=dtype, default=None if pack else "float32", metavar="DTYPE",
                   help="float32, bfloat16 (bf16), float16 (fp16) or auto (the checkpoint's own)"
                   + ("; default: the pack's, else float32 (a pack loads only on the dtype it was made on)"
                      if pack else ""))


def check_device(name: str):
    """The torch device of --device, or None for auto (load_model's choice: CUDA when present)."""
    import torch

    from ..errors import ConfigError

    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"--device {name}: {why} (torch {torch.__version__})")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: no Apple MPS device here")
    return None if name == "auto" else torch.device(name)


def load_lm(args, name: str | None = None, dtype_name: str | None = None):
    """(model, tokenizer) of --model (or `name`) on --device in --dtype (or `dtype_name`)."""
    import torch

    from ..models import load_model
    from ..parallel import join_group, launched

    where = check_device(args.device)
    if launched() > 1 and str(where) == "cuda":  # each rank of a launcher on its own GPU
        where = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    wanted = dtype_name or args.dtype or "float32"
    model, tokenizer = load_model(name or args.model, device=where,
                                  dtype="auto" if wanted == "auto" else getattr(torch, wanted))
    # under a launcher, join its group now, not before: transformers writes files on rank 0 only once a group is up,
    # and every rank may need to write the embedded model's float32 copy on its first load
    join_group()
    if model.device.type == "cpu" and str(model.dtype).removeprefix("torch.") in HALF:
        # allowed (it saves memory), but CPUs have few fast half-precision kernels
        log.warning("megedit: warning: %s on the CPU is slow; float32 is usually faster there",
                    str(model.dtype).removeprefix("torch."))
    return model, tokenizer


def load_pack(args, directory: Path | None = None):
    """The EditedModel of a pack, on the base model it names (or --model), in the dtype it records
    (or --dtype)."""
    from ..edited import EditedModel, read_manifest

    directory = directory or args.pack
    base = read_manifest(directory)["base_model"]
    model, tokenizer = load_lm(args, args.model or base["source"], args.dtype or base.get("dtype"))
    return EditedModel.from_pretrained(directory, model, tokenizer)
