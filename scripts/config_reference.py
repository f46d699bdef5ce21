"""Write docs/reference/config.md: every config field with its default, valid values and help,
read from the fields' metadata (megedit.settings). Re-run after changing a config class:

    .venv/bin/python scripts/config_reference.py          # rewrite the page
    .venv/bin/python scripts/config_reference.py --check  # exit 1 if the page is out of date
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from megedit.baselines.config import FTConfig, MemitConfig
from megedit.config import MeGConfig
from megedit.living import AddConfig
from megedit.settings import choices_of, help_of, range_of, show_value
from megedit.stages.generator.dit import DIT_PRESETS
from megedit.stages.generator.mlp import MLPConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "config.md"

INTRO = """# Config reference

Every setting, its default, the values it accepts and what it does. MeG's settings are the
sections of a `--config` file (YAML or JSON, any subset; `megedit config` prints them all). Each
scalar one is also a flag, and flags override the file. The last three tables are flags only:
those of `megedit add` / `remove` and of the baselines (`megedit eval --method ft|memit|alphaedit`).
A value outside "valid" is refused with one line naming the setting, before any model loads.

This page is generated from the config classes' field metadata by `scripts/config_reference.py`;
edit the classes, then run the script.
"""

# (heading, where its fields are set, the instance whose values are the defaults shown)
SECTIONS = (
    ("Top level", "The top level of a config file; flags `--FIELD` (`--format` for `prompt_format`).",
     MeGConfig()),
    ("fit: stage A, one neuron vector per edit", "Config section `fit`; flags `--fit-FIELD`.", MeGConfig().fit),
    ("routing: stages B and C", "Config section `routing`; flags `--routing-FIELD`.", MeGConfig().routing),
    ("routing.encoder: stage B, the sentence encoder", "Config section `routing.encoder`; flags `--encoder-FIELD`.",
     MeGConfig().routing.encoder),
    ("routing.router: stage C, the router", "Config section `routing.router`; flags `--router-FIELD`.",
     MeGConfig().routing.router),
    ("generator: stage D, the weight generator", "Config section `generator`; flags `--generator-FIELD`.",
     MeGConfig().generator),
    ("generator.dit: the DiT's network", f"Config section `generator.dit` (a config file only): overrides of the "
     f"preset's fields. The defaults shown are those of the default preset, `{MeGConfig().generator.preset}`.",
     DIT_PRESETS[MeGConfig().generator.preset]),
    ("generator.mlp: the MLP generator's network", "Config section `generator.mlp` (a config file only).", MLPConfig()),
    ("megedit add / remove", "Flags of `megedit add` (`--passes`, `--replay`, `--recalibrate`) and `megedit remove` "
     "(`--passes`).",
     AddConfig()),
    ("Baseline FT", "Flags `--ft-FIELD` of `megedit eval --method ft` (`--layer` and `--seed` set those fields).",
     FTConfig()),
    ("Baselines MEMIT and AlphaEdit", "Flags `--memit-FIELD` of `megedit eval --method memit|alphaedit` (the method "
     "sets `method`; `--layers` and `--seed` set those fields).", MemitConfig()),
)


def _valid(f) -> str:
    """The values a field accepts, as the table shows them."""
    choices, valid = choices_of(f), range_of(f)
    if choices:
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    return str(valid) if valid else ""


def _type(hint) -> str:
    name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return name.replace("|", "or")


def section_table(defaults) -> list[str]:
    """One Markdown table row per field of the dataclass instance `defaults`."""
    hints = typing.get_type_hints(type(defaults))
    rows = ["| field | type | default | valid | help |", "|---|---|---|---|---|"]
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        shown = "(section)" if is_dataclass(value) else "`null`" if value is None else f"`{show_value(value)}`"
        text = help_of(f).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_type(hints[f.name])} | {shown} | {_valid(f)} | {text} |")
    return rows


def render() -> str:
    lines = [INTRO]
    for heading, where, defaults in SECTIONS:
        lines += [f"## {heading}", "", where, "", *section_table(defaults), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the page is current")
    page = render()
    if parser.parse_args().check:
        current = PAGE.exists() and PAGE.read_text(encoding="utf-8") == page
        print(f"{PAGE} is {'current' if current else 'out of date: run scripts/config_reference.py'}")
        return 0 if current else 1
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
