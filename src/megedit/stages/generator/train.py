"""Training a generator on (query embedding, fitted vector) pairs.

AdamW, gradient clipping, an EMA of the weights (what is sampled and kept), periodic validation
(sample the first `validation_size` edits, distance to their fitted vectors, and an optional
callback such as the edit success of the generated vectors), the best validation kept, and a
resume checkpoint in `work_dir`. Runs as it is under `accelerate launch` with several processes:
every process draws the same seeded batch order and takes its own share of each batch; the
gradients are averaged by accelerate (data parallel).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...errors import ConfigError
from ...io import load_keyed_state, save_keyed_state
from .lookup import LookupTable
from .model import Generator, GeneratorConfig

log = logging.getLogger(__name__)

Validate = Callable[[torch.Tensor], dict]  # generated vectors of the validation edits -> extra numbers


@dataclass
class FineTune:
    """Go on training `generator` (its weights and its normalisation) instead of a fresh one, for
    `steps` optimiser steps; each batch is drawn with replacement, pair i with probability
    proportional to `weights[i]`, so a few new pairs and many replayed ones mix at a set ratio
    whatever their counts. Adding edits to a pack uses it (living.py)."""

    generator: Generator
    steps: int
    weights: torch.Tensor  # (pairs,) >= 0

    def start(self) -> Generator:
        """A trainable copy of the generator on the CPU."""
        g = self.generator
        net = copy.deepcopy(g.net).cpu().train().requires_grad_(True)
        return Generator(g.config, g.length, g.cond_dim, g.mean, g.std, net=net)

    def digest(self) -> str:
        """What a resumed fine-tune must share with the saved one besides the pairs: start and draws."""
        h = hashlib.sha256(repr(self.steps).encode())
        for v in (*self.generator.net.state_dict().values(), self.weights):
            h.update(v.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _training_pairs(generator: Generator, embeddings: torch.Tensor, vectors: torch.Tensor,
                    unrelated: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    cond, x = embeddings.float().cpu(), generator.normalize(vectors.float().cpu())
    k = round(generator.config.zero_augment * len(x))
    if k:
        if unrelated is None or len(unrelated) < k:
            raise ConfigError(f"zero_augment {generator.config.zero_augment} needs {k} unrelated query embeddings, "
                              f"got {0 if unrelated is None else len(unrelated)}")
        cond = torch.cat([cond, unrelated[:k].float().cpu()])
        x = torch.cat([x, generator.normalize(torch.zeros(k, x.shape[1]))])
    return cond, x


def validation_numbers(generator: Generator, net: torch.nn.Module, cond: torch.Tensor, vectors: torch.Tensor,
                       seed: int) -> tuple[torch.Tensor, dict]:
    """Generated vectors for `cond` and their distance to the fitted `vectors`: relative L2
    (||g - f|| / ||f||, mean) and L2 in normalised units (mean, std; the authors stop at mean + std < 0.5)."""
    generated = generator.generate(cond, seed=seed, net=net).cpu()
    rel = (generated - vectors).norm(dim=1) / vectors.norm(dim=1).clamp(min=1e-9)
    norm_l2 = (generator.normalize(generated) - generator.normalize(vectors)).norm(dim=1) / math.sqrt(vectors.shape[1])
    return generated, {"rel_l2": float(rel.mean()), "l2_mean": float(norm_l2.mean()), "l2_std": float(norm_l2.std())
                       if len(norm_l2) > 1 else 0.0}


def _run_key(config: GeneratorConfig, cond: torch.Tensor, x: torch.Tensor, fine_tune: FineTune | None) -> str:
    """What a resumed run must share with the saved one (not its length or validation cadence)."""
    fixed = {k: v for k, v in vars(config).items() if k not in ("train_steps", "passes", "validate_every")}
    h = hashlib.sha256(repr(sorted(fixed.items())).encode() + (fine_tune.digest().encode() if fine_tune else b""))
    h.update(cond.numpy().tobytes()), h.update(x.numpy().tobytes())
    return h.hexdigest()[:16]


def train_generator(embeddings: torch.Tensor, vectors: torch.Tensor, config: GeneratorConfig | None = None, *,
                    unrelated: torch.Tensor | None = None, work_dir: str | Path | None = None,
                    validate: Validate | None = None, progress: bool = True, n_edits: int | None = None,
                    fine_tune: FineTune | None = None) -> Generator:
    """A generator trained on the pairs (embeddings[i], vectors[i]); with the EMA weights of the
    best validation (the first `validation_size` pairs, which should be edits' own prompts).
    `unrelated` embeddings feed the zero-vector augmentation; `n_edits` (recorded) is how many
    edits the pairs come from when an edit has several wordings. `fine_tune`: start from a trained
    generator (its config is then the one used) with its own step budget and draws."""
    config = (fine_tune.generator.config if fine_tune else config or GeneratorConfig()).validate()
    if len(embeddings) != len(vectors) or len(vectors) < 1 or (fine_tune and len(fine_tune.weights) != len(vectors)):
        raise ConfigError(f"train_generator: {len(embeddings)} embeddings for {len(vectors)} vectors"
                          + (f" and {len(fine_tune.weights)} draw weights" if fine_tune else ""))
    start, n_edits = time.perf_counter(), n_edits or len(vectors)
    generator = fine_tune.start() if fine_tune else Generator.for_vectors(config, vectors, embeddings.shape[1])
    cond, x = _training_pairs(generator, embeddings, vectors, unrelated)
    validation = embeddings[: config.validation_size].float(), vectors[: config.validation_size].float().cpu()
    if config.kind == "lookup":  # no training: the table is the pairs
        return _lookup(generator, cond, x, *validation, validate, start, n_edits)
    total = fine_tune.steps if fine_tune else config.steps_for(n_edits)
    log.info("generator: %d steps of %d pairs (%.0f passes over %d edits, %.0f over their %d pairs)", total,
             config.batch_size, total * config.batch_size / n_edits, n_edits, total * config.batch_size / len(x), len(x))
    run = _Run.start(generator, work_dir, _run_key(config, cond, x, fine_tune), validation, validate)
    if run.state["history"]:  # count the time of the earlier sessions too
        start -= run.state["history"][-1]["seconds"]
    run.train(cond, x, total, _draw_weights(fine_tune, len(x)), start, progress)
    final = _with_weights(generator, run.ema, run.best_weights)
    final.record = {"n_pairs": len(x), "n_edits": n_edits, "steps": run.state["step"], "best": run.state["best"],
                    "history": run.state["history"], "processes": run.accelerator.num_processes,
                    "seconds": time.perf_counter() - start,
                    "parameters": sum(p.numel() for p in final.net.parameters())}
    return final


@dataclass
class _Run:
    """One training run's moving parts: the network (prepared by accelerate), its EMA copy, the
    optimiser, the noise generator, where it checkpoints, and its progress (step, best, history)."""

    generator: Generator
    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: object
    noise: torch.Generator
    checkpoint: Path | None
    key: str
    validation: tuple  # (conditions, fitted vectors) of the validation edits
    validate: Validate | None
    state: dict
    best_weights: dict | None
    rng: torch.Tensor | None  # the dropout RNG state of a resumed run

    @classmethod
    def start(cls, generator: Generator, work_dir, key: str, validation: tuple, validate: Validate | None) -> "_Run":
        """A fresh run, or the one a checkpoint in `work_dir` with the same key left."""
        from accelerate import Accelerator

        config = generator.config
        accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo data parallel when launched so
        net, ema = generator.net, copy.deepcopy(generator.net).requires_grad_(False)
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        net, optimizer = accelerator.prepare(net, optimizer)
        ema.to(accelerator.device)
        noise = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index)
        checkpoint = Path(work_dir) / "generator-train.pt" if work_dir else None
        state, best_weights, rng = _resume(checkpoint, key, accelerator.unwrap_model(net), ema, optimizer, noise)
        return cls(generator, net, ema, optimizer, accelerator, noise, checkpoint, key, validation, validate, state,
                   best_weights, rng)

    def train(self, cond: torch.Tensor, x: torch.Tensor, total: int, weights: torch.Tensor | None, start: float,
              progress: bool) -> None:
        """Steps until `total`, validating (and checkpointing) every `validate_every` and at the end."""
        config, accelerator, state = self.generator.config, self.accelerator, self.state
        ema_params = list(self.ema.parameters())
        bar = tqdm(total=total, initial=state["step"], desc=f"training {config.kind} generator",
                   disable=not progress or not accelerator.is_main_process)
        with torch.random.fork_rng(devices=[]):  # dropout draws, seeded, without touching the caller's RNG
            torch.manual_seed(config.seed * 1000 + accelerator.process_index)
            if self.rng is not None:
                torch.set_rng_state(self.rng)
            while state["step"] < total:
                step = state["step"]
                rows = _batch_rows(step, len(x), config, weights)[accelerator.process_index :: accelerator.num_processes]
                loss = _train_step(self.generator, self.net, self.optimizer, ema_params, accelerator,
                                   (x[rows], cond[rows]), self.noise, step)
                state["step"] = step + 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if state["step"] % config.validate_every == 0 or state["step"] == total:
                    self._validation(loss.item(), start)
        bar.close()

    def _validation(self, loss: float, start: float) -> None:
        """Validate the EMA weights, keep them if best, checkpoint."""
        state = self.state
        numbers = _validation_point(self.generator, self.ema, self.validation, self.validate, self.accelerator,
                                    {"step": state["step"], "loss": loss, "seconds": time.perf_counter() - start})
        state["history"].append(numbers)
        if state["best"] is None or numbers["rel_l2"] < state["best"]["rel_l2"]:
            state["best"] = numbers
            self.best_weights = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        if self.checkpoint is not None and self.accelerator.is_main_process:
            _save_checkpoint(self.checkpoint, self.key, state, self.accelerator.unwrap_model(self.net), self.ema,
                             self.optimizer, self.noise, self.best_weights)
        self.accelerator.wait_for_everyone()


def _draw_weights(fine_tune: FineTune | None, n_pairs: int) -> torch.Tensor | None:
    """A fine-tune's draw weight per training pair; the zero-vector rows of zero_augment come last
    and are drawn as often as an average pair."""
    if fine_tune is None:
        return None
    weights = fine_tune.weights.float()
    return torch.cat([weights, weights.mean().expand(n_pairs - len(weights))])


def _batch_rows(step: int, n: int, config: GeneratorConfig, weights: torch.Tensor | None) -> torch.Tensor:
    """The pairs of batch `step`, the same in every process and on a resume: a seeded permutation
    per epoch, or (with draw weights) a seeded draw with replacement per step."""
    if weights is not None:
        draw = torch.Generator().manual_seed(config.seed * 100003 + step)
        return torch.multinomial(weights, config.batch_size, replacement=True, generator=draw)
    epoch, offset = divmod(step, max(1, -(-n // config.batch_size)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    return order[offset * config.batch_size : (offset + 1) * config.batch_size]


def _train_step(generator: Generator, net, optimizer, ema_params: list, accelerator, batch: tuple, noise,
                step: int) -> torch.Tensor:
    """One optimiser step on `batch` (targets, conditions) and the EMA update after it; the loss."""
    config = generator.config
    net.train()
    loss = generator.loss(net, batch[0].to(accelerator.device), batch[1].to(accelerator.device), noise)
    optimizer.zero_grad()
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(net.parameters(), config.grad_clip)
    optimizer.step()
    decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up: early weights fade fast
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, list(accelerator.unwrap_model(net).parameters()), 1 - decay)
    return loss


def _with_weights(generator: Generator, ema, best_weights: dict | None) -> Generator:
    """A frozen CPU copy of `generator` on the EMA network, with the best validation's weights where known."""
    final = Generator(generator.config, generator.length, generator.cond_dim, generator.mean, generator.std,
                      net=copy.deepcopy(ema).cpu())
    if best_weights is not None:
        final.net.load_state_dict(best_weights)
    final.net.eval().requires_grad_(False)
    return final


def _resume(checkpoint: Path | None, key: str, net, ema, optimizer, noise) -> tuple[dict, dict | None, torch.Tensor | None]:
    """(progress state, best EMA weights, dropout RNG state) of a checkpoint this same run left, its
    weights, optimiser and noise restored in place; a fresh start otherwise."""
    fresh = ({"step": 0, "best": None, "history": []}, None, None)
    saved = None if checkpoint is None else load_keyed_state(checkpoint, key, "generator checkpoint")
    if saved is None:
        return fresh
    net.load_state_dict(saved["net"])
    ema.load_state_dict(saved["ema"])
    optimizer.load_state_dict(saved["optimizer"])
    noise.set_state(saved["noise"])
    log.info("generator: resuming at step %d", saved["step"])
    return ({"step": saved["step"], "best": saved["best"], "history": saved["history"]}, saved["best_weights"],
            saved["torch_rng"])


def _validation_point(generator: Generator, ema, validation: tuple, validate: Validate | None, accelerator,
                      progress: dict) -> dict:
    """The validation numbers of the EMA weights now (with `progress`: step, loss, seconds),
    computed on the main process and shared with all."""
    from accelerate.utils import broadcast_object_list

    numbers = None
    if accelerator.is_main_process:
        generated, numbers = validation_numbers(generator, ema, *validation, generator.config.seed)
        if validate is not None:
            numbers |= validate(generated)
        numbers |= progress
        log.info("generator step %d: %s", progress["step"],
                 ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if k != "step"))
    return broadcast_object_list([numbers])[0]


def _lookup(generator: Generator, cond, x, val_cond, val_vectors, validate: Validate | None, start: float,
            n_edits: int) -> Generator:
    """The lookup generator: its table is the training pairs; validated once, like a trained one."""
    generator.net = LookupTable(cond, x).eval().requires_grad_(False)
    generated, numbers = validation_numbers(generator, generator.net, val_cond, val_vectors, generator.config.seed)
    if validate is not None:
        numbers |= validate(generated)
    numbers |= {"step": 0, "seconds": time.perf_counter() - start}
    generator.record = {"n_pairs": len(x), "n_edits": n_edits, "steps": 0, "best": numbers,
                        "history": [numbers], "processes": 1, "seconds": numbers["seconds"],
                        "parameters": 0, "table_rows": len(x)}
    return generator


def _save_checkpoint(path: Path, key: str, state: dict, net, ema, optimizer, noise: torch.Generator,
                     best_weights: dict | None) -> None:
    save_keyed_state(path, key, {
        "step": state["step"], "best": state["best"], "history": state["history"], "net": net.state_dict(),
        "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "noise": noise.get_state(),
        "torch_rng": torch.get_rng_state(), "best_weights": best_weights})
