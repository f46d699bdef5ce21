"""FT: the paper's fine-tuning baseline. All N edits at once, only the MLP of one layer trained
(the layer MeG attaches its neuron to), plain SGD for a few epochs. Optionally as constrained
fine-tuning (FT-L, Zhu et al. 2020): every weight kept within `norm_constraint` of its original
value, and training stopped once an epoch's mean loss is below `stop_loss`.

The layers below the trained MLP never change, so their output is computed once per batch and
reused every epoch (`lm.layer_input` / `lm.starting_at_layer`). With a checkpoint file the
training state is saved after every epoch: a killed run resumes from its last finished epoch,
and a finished one is loaded instead of trained again (FT on 10,000 edits takes hours here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..arch import mlp_path, resolve_layer
from ..data.prompts import PromptFormat
from ..data.requests import EditRequest
from ..io import load_keyed_state, save_keyed_state
from ..lm import Batch, layer_input, left_pad, length_batches, model_device, starting_at_layer
from ..methods import EditJob
from ..models import model_fingerprint
from ..runtime.subject import WeightEditSubject
from .config import FTConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingBatch:
    """Edits as one left-padded batch of prompt + answer, with labels on the answer tokens."""

    batch: Batch
    labels: torch.Tensor  # (B, K): the last K positions' next-token labels, -100 where no loss

    @classmethod
    def build(cls, prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_id: int,
              device) -> "TrainingBatch":
        batch = left_pad([p + a for p, a in zip(prompts, answers)], pad_id, device)
        span = max(len(a) for a in answers) + 1
        labels = torch.full((len(answers), span), -100, dtype=torch.long)
        for row, answer in enumerate(answers):
            labels[row, span - 1 - len(answer) : span - 1] = torch.as_tensor(answer)
        return cls(batch, labels.to(device))

    def select(self, rows: torch.Tensor) -> "TrainingBatch":
        """The same batch restricted to `rows` (its padding width unchanged)."""
        b = self.batch
        return TrainingBatch(Batch(b.ids[rows], b.mask[rows], b.positions[rows]), self.labels[rows])

    @property
    def span(self) -> int:
        return self.labels.shape[1]

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens; logits are those of the last `span` positions."""
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten())


def edit_batches(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat,
                 batch_size: int) -> list[tuple[list[int], TrainingBatch]]:
    """Each edit's prompt and its answer followed by the end-of-answer token, batched by length:
    (the requests' indices, their batch) per batch."""
    prompts = [fmt.prompt_ids(r.prompt, tokenizer) for r in requests]
    answers = [fmt.answer_ids(r.target, tokenizer, with_stop=True) for r in requests]
    device = model_device(model)
    return [
        (idx, TrainingBatch.build([prompts[i] for i in idx], [answers[i] for i in idx], tokenizer.pad_token_id, device))
        for idx in length_batches([len(p) + len(a) for p, a in zip(prompts, answers)], batch_size)
    ]


class _Training:
    """The trained MLP's parameters, their optimiser and, for FT-L, the box each weight stays in."""

    def __init__(self, mlp, config: FTConfig) -> None:
        self.config = config
        self.params = list(mlp.parameters())
        self.optimiser = (torch.optim.Adam(self.params, lr=config.lr) if config.optimizer == "adam" else
                          torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum))
        eps = config.norm_constraint
        self.box = [(p.detach() - eps, p.detach() + eps) for p in self.params] if eps else None
        self.order = torch.Generator().manual_seed(config.seed)

    def epoch(self, model, batches, hidden) -> float:
        """One pass over the batches in a seeded order; the mean loss."""
        total = 0.0
        for i in torch.randperm(len(batches), generator=self.order).tolist():
            with starting_at_layer(model, self.config.layer, hidden[i]):
                logits = model(**batches[i].batch.model_inputs, use_cache=False, logits_to_keep=batches[i].span).logits
            loss = batches[i].loss(logits)
            self.optimiser.zero_grad()
            loss.backward()
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.optimiser.step()
            if self.box:
                with torch.no_grad():
                    for p, (low, high) in zip(self.params, self.box):
                        torch.clamp(p, low, high, out=p)
            total += loss.item()
        return total / len(batches)

    def run(self, model, batches, hidden, losses: list[float], progress: bool, after_epoch) -> None:
        """Epochs until the training is finished, each one's mean loss appended to `losses`."""
        for p in self.params:
            p.requires_grad_(True)
        try:
            bar = tqdm(total=self.config.epochs, initial=len(losses), desc="FT epochs", disable=not progress, leave=False)
            while not self.finished(losses):
                losses.append(self.epoch(model, batches, hidden))
                log.info("FT epoch %d: mean loss %.4f", len(losses), losses[-1])
                after_epoch()
                bar.update()
            bar.close()
        finally:
            for p in self.params:
                p.requires_grad_(False)

    def finished(self, losses: list[float]) -> bool:
        stop = self.config.stop_loss
        return len(losses) >= self.config.epochs or bool(losses and stop is not None and losses[-1] < stop)

    def save(self, path: Path, key: str, losses: list[float], seconds: float) -> None:
        """The weights, the optimiser's state and the batch order's RNG after an epoch, atomically."""
        save_keyed_state(path, key, {"losses": losses, "seconds": seconds, "params": [p.detach() for p in self.params],
                                     "optimiser": self.optimiser.state_dict(), "order": self.order.get_state()})

    def restore(self, path: Path, key: str) -> tuple[list[float], float]:
        """(epoch losses, seconds) of the training saved in `path`, its state put back; nothing if
        there is no such file or a different training (model, edits, settings) wrote it."""
        state = load_keyed_state(path, key, "FT checkpoint")
        if state is None:
            return [], 0.0
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimiser.load_state_dict(state["optimiser"])
        self.order.set_state(state["order"])
        log.info("FT: %d epoch(s) restored from %s", len(state["losses"]), path)
        return state["losses"], state["seconds"]


def _training_key(model, requests: Sequence[EditRequest], fmt: PromptFormat, config: FTConfig) -> str:
    """What an FT training depends on: the base weights, the edits, the prompt format, the settings."""
    return hashlib.sha256(json.dumps({
        "model": model_fingerprint(model), "edits": [[r.prompt, r.subject, r.target] for r in requests],
        "format": fmt.to_dict(), "config": asdict(config),
    }, sort_keys=True).encode()).hexdigest()


def fine_tune(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat,
              config: FTConfig | None = None, progress: bool = True,
              checkpoint: str | Path | None = None) -> WeightEditSubject:
    """Fine-tune the MLP of `config.layer` on all edits; returns the edited model as a subject
    whose `unedited()` brings the original weights back exactly. `checkpoint`: the file the
    training state goes to after each epoch and is resumed from (the caller deletes it when
    done with the result); its settings' `edit_time_s` then counts the killed runs' epochs too."""
    config = (config or FTConfig()).validate()
    config = replace(config, layer=resolve_layer(model, config.layer))
    start = time.perf_counter()
    mlp = model.get_submodule(mlp_path(model, config.layer))
    prefix = mlp_path(model, config.layer) + "."
    originals = {prefix + n: p.detach().clone() for n, p in mlp.named_parameters()}
    training = _Training(mlp, config)
    path = Path(checkpoint) if checkpoint is not None else None
    key = _training_key(model, requests, fmt, config) if path else ""
    losses, seconds = training.restore(path, key) if path else ([], 0.0)
    if not training.finished(losses):
        earlier_s = seconds
        batches = [b for _, b in edit_batches(model, tokenizer, requests, fmt, config.batch_size)]
        with torch.no_grad():
            hidden = [layer_input(model, config.layer, b.batch) for b in
                      tqdm(batches, desc="FT layer inputs", disable=not progress or len(batches) < 2, leave=False)]

        def after_epoch() -> None:
            nonlocal seconds
            seconds = earlier_s + time.perf_counter() - start
            if path:
                training.save(path, key, losses, seconds)

        training.run(model, batches, hidden, losses, progress, after_epoch)
    settings = {**asdict(config), "method": "ft", "trained": prefix.rstrip("."), "epoch_losses": losses,
                "edit_time_s": seconds}
    return WeightEditSubject(model, tokenizer, "ft", originals, settings)


def edit_with_ft(job: EditJob) -> WeightEditSubject:
    """The method registry's entry for "ft" (megedit/methods.py)."""
    config = replace(job.config, layer=resolve_layer(job.model, job.config.layer))
    log.info("fine-tuning layer %d on %d edits", config.layer, len(job.requests))
    return fine_tune(job.model, job.tokenizer, job.requests, job.fmt, config, progress=job.progress,
                     checkpoint=job.checkpoint)
