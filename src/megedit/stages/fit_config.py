"""Stage A's settings (FitConfig) and its result (FitResult: one fitted neuron vector per edit, with
how each fit went), saved beside a fit and read back by a later one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from ..neuron import VARIANTS, NeuronSpec
from ..settings import check_settings, setting
from .variants import EXCLUDE_MODES

OPTIMIZERS = ("adam", "sgd")
# which of an edit's wordings train (all of them pass a test at one vector before the edit is done):
# all - every wording from the first step; prompt-first - the prompt alone at first, each other wording
# joining for good when a test finds it failing (tests come when the trained wordings all pass), so a
# wording the vector already carries costs a forward pass, not a backward one
WORDING_SCHEDULES = ("all", "prompt-first")


@dataclass
class FitConfig:
    layer: int | None = setting(None, at_least=0, help="null: the architecture's default (24 on SmolLM2)")
    variant: str | None = setting(None, choices=VARIANTS, help=(
        "the neuron's form; null: the architecture's default (linear for gated MLPs)"))
    optimizer: str = setting("adam", choices=OPTIMIZERS, help="sgd is the authors' setting (lr 0.01-0.07)")
    lr: float = setting(0.3, above=0, help=(
        "Adam's; 0.1 takes about half again as many steps to margin 3 (docs/method.md, stage A)"))
    max_steps: int = setting(200, at_least=1, help=(
        "optimiser steps per edit at most; the chat wording makes a few edits slow: 100 left 1 of 64 own facts "
        "unfitted"))
    restart_steps: int | None = setting(60, at_least=1, help=(
        "an edit not fitted after this many steps starts again from the initial vector at restart_lr (lr 0.3 "
        "overshoots a few edits that 0.1 fits in 20-60 steps); null: never"))
    restart_lr: float = setting(0.1, above=0, help="the learning rate of an edit started again")
    batch_size: int = setting(64, at_least=1, help="edits fitted together")
    margin: float = setting(3.0, at_least=0, help=(
        "logits by which each answer token must lead the runner-up; 1 fits the prompt alone, 3 carries the edit to "
        "paraphrases (docs/method.md, stage A)"))
    init_seed: int = setting(0, help="seeds the one initial vector every edit starts from")
    warm_start: bool = setting(True, help=(
        "an edit whose answer an edit before it in its block of the fitting order has starts from that edit's fitted "
        "vector, at warm_lr, not from the initial one (most CounterFact targets recur)"))
    warm_lr: float = setting(0.1, above=0, help=(
        "the learning rate of a warm-started edit: at lr 0.3 the first steps throw away most of what it starts "
        "with"))
    wording_schedule: str = setting("prompt-first", choices=WORDING_SCHEDULES, help=(
        "which wordings train at a step: all, or the prompt first and each other wording once a test finds it "
        "failing (about half the cost)"))
    # other wordings fitted with the prompt, all sharing its vector (stages/variants.py; MeGEditor builds them)
    paraphrases: int = setting(4, at_least=0, help="pool paraphrases per edit, fitted with the prompt")
    prefixes: int = setting(0, at_least=0, help=(
        "context prefixes per edit, drawn from prefix_pool sentences the model writes"))
    lone_prefixes: int = setting(2, at_least=0, help=(
        "context prefixes for an edit the pool has no paraphrase for (at least this many; prefixes when more)"))
    prefix_pool: int = setting(12, at_least=0, help="sentences the model writes for the context prefixes")
    prefix_tokens: int = setting(10, at_least=0, help="tokens per context prefix")
    exclude_eval_templates: str = setting("none", choices=EXCLUDE_MODES, help=(
        "benchmark only: own / all keep the test rephrases' wordings out"))
    chat_wording: bool = setting(True, help=(
        "fit the prompt as a one-turn chat too, its answer ended by end-of-turn: chat replies then say the target "
        "and stop (tokenizers with a chat template; docs/method.md)"))
    chat_margin: float = setting(1.0, at_least=0, help="the chat wording's success margin (the others': margin)")
    chat_answer_space: bool = setting(False, help=(
        "the chat wording's answer begins with a space, as after a cloze prompt: every wording then trains the "
        "same answer tokens (docs/method.md)"))
    chat_system: str | None = setting(None, help="the chat wording's system message; null: the template's default")
    quiet_chat_opening: bool = setting(True, help=(
        "the neuron stays off on a chat's opening (system turn and user header), in fitting and in use: stage A "
        "then runs the opening once for every chat row, not once per row and step (docs/method.md)"))
    max_prompt_tokens: int = setting(512, at_least=1, help=(
        "longer edit wordings are refused: fitting one costs minutes and says nothing"))

    def __post_init__(self) -> None:
        self.validate()  # at construction: a bad FitConfig never reaches the fitting loop

    def validate(self) -> "FitConfig":
        return check_settings(self, "fit config")


@dataclass
class FitResult:
    """One fitted vector per edit, in the order of the requests."""

    case_ids: list[str]
    vectors: torch.Tensor  # (N, size)
    success: torch.Tensor  # (N,) bool
    steps: torch.Tensor  # (N,) int: optimisation steps taken
    loss: torch.Tensor  # (N,) float: answer cross-entropy of the returned vector
    spec: NeuronSpec
    config: FitConfig
    timing: dict = field(default_factory=dict)
    wordings: torch.Tensor | None = None  # (N,) int: wordings fitted per edit, the prompt included
    wordings_ok: torch.Tensor | None = None  # (N,) float: share of them passing with the returned vector

    def __post_init__(self) -> None:
        if self.wordings is None:
            self.wordings = torch.ones(len(self.case_ids), dtype=torch.long)
        if self.wordings_ok is None:
            self.wordings_ok = self.success.float()

    @property
    def success_rate(self) -> float:
        return 100.0 * float(self.success.float().mean())

    def save(self, path: str | Path) -> Path:
        """Vectors and per-edit outcomes as safetensors, the rest as JSON beside it."""
        path = Path(path)
        atomic_save_tensors(path, {"vectors": self.vectors, "success": self.success.to(torch.uint8),
                                   "steps": self.steps, "loss": self.loss, "wordings": self.wordings,
                                   "wordings_ok": self.wordings_ok})
        atomic_write_json(path.with_suffix(".json"), {**self.summary(), "case_ids": self.case_ids})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FitResult":
        path = Path(path)
        t = load_tensors(path, "fit result")
        meta, spec, config = read_record(path, "fit result", lambda m: (
            m, NeuronSpec(**m["spec"]), FitConfig(**m["config"])))
        return cls(meta["case_ids"], t["vectors"], t["success"].bool(), t["steps"], t["loss"], spec, config,
                   meta.get("timing", {}), t.get("wordings"), t.get("wordings_ok"))

    def summary(self) -> dict:
        done = self.steps[self.success].float()
        return {
            "n": len(self.case_ids), "success_rate": self.success_rate,
            "median_steps": float(done.median()) if len(done) else None,
            "mean_steps": float(done.mean()) if len(done) else None,
            "failed": [c for c, ok in zip(self.case_ids, self.success.tolist()) if not ok],
            "mean_wordings": float(self.wordings.float().mean()) if len(self.wordings) else None,
            "wordings_passed": 100.0 * float(self.wordings_ok.mean()) if len(self.wordings_ok) else None,
            "spec": self.spec.to_dict(), "config": asdict(self.config), "timing": self.timing,
        }
