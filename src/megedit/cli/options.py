"""Command-line flags derived from the config dataclasses, and the config they give back.

`add_dataclass_flags` turns each int / float / str / bool field (Optional ones included) of a
dataclass into `--PREFIX-FIELD-NAME`, typed as the field, with the help, choices and range of the
field's metadata (megedit.settings) and its default. Its dest is `cfg:` + the field's dotted path in MeGConfig (e.g. `cfg:fit.margin`) and its
default SUPPRESS, so `overrides` finds exactly the flags given, as nested settings that are
merged over a config file and then checked by config.py like a file would be.
"""

from __future__ import annotations

import argparse
import functools
import types
import typing
from dataclasses import dataclass, fields

from ..settings import choices_of, help_of, range_of, show_value
from .types import positive_int, scalar

DEST = "cfg:"


@dataclass(frozen=True)
class Section:
    path: tuple[str, ...]  # where its fields live in MeGConfig; () is the top level
    prefix: str  # of its flags: --PREFIX-FIELD; '' for none
    title: str


MEG_SECTIONS = (
    Section((), "", "MeG settings (the top level of a --config file)"),
    Section(("fit",), "fit", "stage A, fitting one neuron vector per edit (config section fit)"),
    Section(("routing", "encoder"), "encoder", "stage B, tuning the sentence encoder (config section routing.encoder)"),
    Section(("routing", "router"), "router", "stage C, the router (config section routing.router)"),
    Section(("routing",), "routing", "stages B and C (config section routing)"),
    Section(("generator",), "generator", "stage D, the weight generator (config section generator; "
            "its dit / mlp network settings only in a --config file)"),
)
# MeGConfig.resolved() copies the top level's layer and seed into these, so they get no flags;
# the prompt format is --format, as for the data
RESOLVED = {"": ("prompt_format",), "fit": ("layer", "init_seed"), "routing": ("seed",),
            "routing.encoder": ("seed",), "routing.router": ("seed",), "generator": ("seed",)}
# the shorter names users and scripts already know; each means one thing on every verb
ALIASES = {
    "fit": {"optimizer": ("--optimizer",), "max_steps": ("--max-steps",), "margin": ("--margin",),
            "paraphrases": ("--paraphrases",), "prefixes": ("--prefixes",), "variant": ("--variant",)},
    "routing.encoder": {"temperature": ("--temperature",)},
    "routing.router": {"kind": ("--router",), "max_epochs": ("--router-epochs",), "epsilon": ("--epsilon",),
                       "max_false_fire": ("--max-false-fire",)},
    "generator": {"kind": ("--generator",), "train_steps": ("--generator-steps",)},
}


def _scalar_kind(hint) -> tuple[type | None, bool]:
    """(int | float | str | bool, Optional or not) of a field's type; (None, False) for others."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = [a for a in args if a is not type(None)]
    if len(plain) == 1 and plain[0] in (int, float, str, bool):
        return plain[0], len(args) > 1
    return None, False


def _counts_from_one(f) -> bool:
    """An int field whose range starts at 1: a usage error at once, not after loading."""
    valid = range_of(f)
    return valid is not None and valid.low == 1 and not valid.low_open and valid.high is None


def add_dataclass_flags(parser, defaults, section: Section, skip=(), aliases=None) -> None:
    """One flag per scalar field of the dataclass instance `defaults` (its values are the defaults
    shown); nested dataclasses and dicts are left to their own sections or to a config file.
    `aliases`: field -> extra flag names. Help, allowed values and counts (ints of at least 1) come
    from each field's metadata (megedit.settings)."""
    group = parser.add_argument_group(section.title)
    hints = typing.get_type_hints(type(defaults))
    for f in fields(defaults):
        kind, optional = _scalar_kind(hints[f.name])
        if kind is None or f.name in skip:
            continue
        path = ".".join((*section.path, f.name))
        names = ("--" + "-".join(filter(None, (section.prefix, *f.name.split("_")))), *(aliases or {}).get(f.name, ()))
        valid = range_of(f)
        text = help_of(f) + (f"; must be {valid}" if valid else "")
        text = f"{text} (default: {show_value(getattr(defaults, f.name))})".strip().replace("%", "%%")
        common = dict(dest=DEST + path, default=argparse.SUPPRESS, help=text)
        if kind is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
            continue
        allowed = choices_of(f)
        parse = positive_int if kind is int and _counts_from_one(f) and not optional else scalar(kind, optional)
        group.add_argument(*names, type=parse, **common,
                           choices=(*allowed, None) if allowed and optional else allowed,
                           metavar="{" + ",".join(allowed) + "}" if allowed else f.name.upper())


def overrides(args) -> dict:
    """The config flags given, as nested settings: {'fit': {'margin': 2.0}, ...}."""
    given: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(DEST):
            *parents, name = dest[len(DEST):].split(".")
            node = given
            for key in parents:
                node = node.setdefault(key, {})
            node[name] = value
    return given


def _section_defaults(root, path: tuple[str, ...]):
    return functools.reduce(getattr, path, root)


def _add_sections(parser, sections, aliases=ALIASES, keep=()) -> None:
    """The flags of `sections`, defaults from MeGConfig()."""
    from ..config import MeGConfig

    root = MeGConfig()
    for s in sections:
        key = ".".join(s.path)
        skip = [name for name in RESOLVED.get(key, ()) if name not in keep]
        add_dataclass_flags(parser, _section_defaults(root, s.path), s, skip=skip, aliases=aliases.get(key, {}))


def add_meg_flags(parser, formats: bool = False) -> None:
    """--config and one flag per MeG setting (built when the verb is used: the classes import torch)."""
    from pathlib import Path

    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="MeG settings, YAML or JSON, any subset (`megedit config` prints them all); "
                        "flags override the file")
    if formats:
        parser.add_argument("--format", dest="prompt_format", choices=("raw", "qa", "chat"), default=None,
                            help="prompt wrapping (config prompt_format)")
    parser.defer(lambda p: _add_sections(p, MEG_SECTIONS))


def meg_config(args, verb_defaults: dict | None = None, prompt_format: str | None = None):
    """MeGConfig from the dataclass defaults, then the verb's own (only without --config), then
    --config, then the flags given; every value checked before any data or model loads."""
    from ..config import MeGConfig, layered

    settings = MeGConfig.from_file(args.config).to_dict() if args.config else layered(MeGConfig().to_dict(),
                                                                                      verb_defaults or {})
    given = overrides(args)
    if prompt_format or getattr(args, "prompt_format", None):
        given["prompt_format"] = prompt_format or args.prompt_format
    config = MeGConfig.from_dict(layered(settings, given), where="settings")
    config.resolved()  # validates every stage's settings now, not after minutes of fitting
    return config


def add_fit_flags(parser) -> None:
    """Stage A's settings on the stage verbs, which are all about stage A: no prefix (--lr, --margin)."""
    section = Section(("fit",), "", "stage A settings (config section fit)")
    parser.defer(lambda p: _add_sections(p, [section], {"fit": {"init_seed": ("--seed",)}}, keep=("init_seed",)))


def fit_config(args, layer: int | None):
    from ..stages.fit_config import FitConfig

    return FitConfig(**{**overrides(args).get("fit", {}), "layer": layer})


def add_routing_flags(parser) -> None:
    """Stages B and C's settings on fit-router."""
    parser.defer(lambda p: _add_sections(p, MEG_SECTIONS[2:5]))


def routing_config(args, seed: int):
    """RoutingConfig of the flags given, `seed` in each part, validated."""
    from ..stages.encoder import EncoderConfig
    from ..stages.router import RouterConfig
    from ..stages.routing import RoutingConfig

    given = overrides(args).get("routing", {})
    encoder = EncoderConfig(**{**given.pop("encoder", {}), "seed": seed})
    router = RouterConfig(**{**given.pop("router", {}), "seed": seed})
    return RoutingConfig(encoder, router, seed=seed, **given).validate()


LIVING = Section(("add",), "", "adding and removing edits (living.AddConfig)")


def add_living_flags(parser, skip=()) -> None:
    """The settings of adding and removing edits: --passes, --replay, --recalibrate (less `skip`)."""
    parser.defer(lambda p: _living_flags(p, skip))


def _living_flags(parser, skip) -> None:
    from ..living import AddConfig

    add_dataclass_flags(parser, AddConfig(), LIVING, skip=skip)


def living_config(args):
    """AddConfig of the flags given (typed by argparse), validated before any model loads."""
    from ..living import AddConfig

    return AddConfig(**overrides(args).get("add", {})).validate()
