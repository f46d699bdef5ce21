"""The editing methods, by name: the one place a method's name meets its code.

Each entry names its settings dataclass and the function that edits a model with it, as
`module:attribute` references loaded when used, so that the CLI lists the methods and builds their
flags without importing a model library. Adding a method is one file with its edit function
(taking an `EditJob`) and one entry in `METHODS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class EditJob:
    """What a weight-editing method is given: the model, the edits, their prompt format and the
    method's validated settings."""

    model: Any
    tokenizer: Any
    requests: Sequence[Any]
    fmt: Any
    config: Any
    progress: bool = True
    checkpoint: Path | None = None  # FT: its training state after each epoch, so a killed run resumes
    covariance_texts: Callable[[], Sequence[str]] | None = None  # MEMIT / AlphaEdit: key covariance texts, on demand


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    name: str
    config_ref: str  # "module:Class" of its settings dataclass
    edit_ref: str | None  # "module:function" taking an EditJob; None: fitted by its own verb (megedit fit)
    flags: str  # prefix of its settings' flags on `megedit eval` (methods sharing a settings class share it)
    main_setting: str  # the setting a sweep varies first
    fixed: tuple[tuple[str, Any], ...] = ()  # settings its name implies
    needs_covariance: bool = False  # edits through a key covariance (EditJob.covariance_texts)
    resumes: bool = False  # takes EditJob.checkpoint: a killed edit resumes, its edit_time_s counting the killed runs
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()  # short flags of its settings beside the prefixed ones

    @property
    def config(self) -> type:
        return _load(self.config_ref)

    def edit(self, job: EditJob) -> Any:
        """The edited model, as a subject the harness scores and `restore()` undoes."""
        if self.edit_ref is None:
            raise ConfigError(f"{self.name} is fitted with `megedit fit`, not by editing weights in place")
        return _load(self.edit_ref)(job)

    def settings(self, given: dict, **common: Any) -> Any:
        """Its settings dataclass from the flags `given`, the settings its name implies, and those of
        `common` (e.g. layer, layers, seed) that the class has; validated."""
        names = {f.name for f in fields(self.config)}
        return self.config(**given, **dict(self.fixed), **{k: v for k, v in common.items() if k in names}).validate()


METHODS = {m.name: m for m in (
    Method("meg", "megedit.config:MeGConfig", None, "", "generator.kind"),
    Method("ft", "megedit.baselines.config:FTConfig", "megedit.baselines.ft:edit_with_ft", "ft", "lr", resumes=True,
           aliases=(("lr", ("--lr",)), ("epochs", ("--epochs",)))),
    Method("memit", "megedit.baselines.config:MemitConfig", "megedit.baselines.memit:edit_with_memit", "memit",
           "mom2_weight", fixed=(("method", "memit"),), needs_covariance=True),
    Method("alphaedit", "megedit.baselines.config:MemitConfig", "megedit.baselines.memit:edit_with_memit", "memit",
           "l2", fixed=(("method", "alphaedit"),), needs_covariance=True),
)}
# the methods `megedit eval --method` runs on a loaded model (MeG is scored from its pack)
WEIGHT_EDITORS = tuple(name for name, m in METHODS.items() if m.edit_ref is not None)


def get_method(name: str) -> Method:
    """The method called `name`; a ConfigError naming the known ones for anything else."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, found {name!r}")
    return METHODS[name]
