"""MeGEditor: runs stages A-D in dependency order and returns the EditedModel.

Each stage writes its artefact under `work_dir/<stage>/<key>/`, the key a hash of everything
the stage's output depends on (base model, edits, pool, settings, upstream keys). A rerun finds
finished stages and skips them; an interrupted stage resumes from its own checkpoints (fitting
shards, generator checkpoint). Stage A's shards (work_dir/fit-shards) are per edit, so a fit of
a larger edit set fits only the edits no earlier fit in this work_dir did. A and B/C are independent; D needs both. B (the encoder) depends
on the pool alone, so fits of growing edit sets in one work_dir train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from .config import MeGConfig
from .data.demo import fallback_pool
from .data.prompts import get_format
from .data.requests import EditRequest, pool_apart_from
from .data.subjects import with_subjects
from .data.wordings import behind_prefix
from .edit_table import EditTable
from .edited import EditedModel
from .errors import ConfigError
from .eval import evaluate
from .io import atomic_write_json
from .models import SentenceEncoder, load_encoder, model_fingerprint
from .parallel import check_forkable, ranks
from .runtime.subject import vector_table_subject
from .stages.encoder import (encoder_delta_record, load_encoder_delta, train_encoder, training_triples,
                             write_encoder_delta)
from .stages.fit_config import FitResult
from .stages.fit_neurons import fit_neurons
from .stages.generator import Generator, train_generator
from .stages.router import Router
from .stages.routing import fit_router, split_for_edits
from .stages.variants import build_variants, context_prefixes, relation_template

log = logging.getLogger(__name__)

MIN_POOL = 8  # records with a rephrase that stages B and C need (stages/routing.split_pool)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _records(requests: Sequence[EditRequest]) -> list[dict]:
    return [r.to_dict() for r in requests]


def usable_pool(requests: Sequence[EditRequest], pool: Sequence[EditRequest] | None,
                name: str) -> tuple[list[EditRequest], str]:
    """The pool to fit with: `pool`, or the shipped fallback pool when `pool` has fewer than
    MIN_POOL records with a rephrase apart from the edits (said in one log line)."""
    usable = [r for r in pool_apart_from(pool or [], requests) if r.rephrases]
    if len(usable) >= MIN_POOL:
        return list(pool), name
    log.info("pseudo-edit pool: %s has %d records with a rephrase (fewer than %d); using megedit's fallback "
             "pool of 240 true facts", name if pool else "none given", len(usable), MIN_POOL)
    return fallback_pool(), "megedit fallback pool"


class MeGEditor:
    """`MeGEditor(model, tokenizer, MeGConfig()).fit(requests, work_dir, pool)` -> EditedModel."""

    def __init__(self, model, tokenizer, config: MeGConfig | None = None, *, encoder: SentenceEncoder | None = None,
                 progress: bool = True, processes: int = 1) -> None:
        self.model, self.tokenizer = model, tokenizer
        check_forkable(model, processes)  # before any work, not at stage A
        self.processes = processes  # stage A's (fit_neurons): forked one-thread CPU processes, one part each
        self.config = (config or MeGConfig()).resolved()
        self.progress = progress
        self._encoder = encoder
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.progress)
        return self._fingerprint

    @property
    def base_encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.config.encoder, device=next(self.model.parameters()).device)
        return self._encoder

    def fit(self, requests: Sequence[EditRequest], work_dir: str | Path, pool: Sequence[EditRequest] | None = None,
            pool_name: str = "pool") -> EditedModel:
        """Edit the model with `requests`. `pool`: pseudo-edit records disjoint from the edits
        (with rephrases; locality prompts help), for the encoder's training and epsilon's
        calibration; edit ids and prompts are left out of it in any case. Without a pool that has
        rephrases, megedit's own fallback pool serves (data/demo.py)."""
        if not requests:
            raise ConfigError("fit: no edit requests")
        requests, pool, pool_name = self._inputs(requests, pool, pool_name)
        work_dir = Path(work_dir)
        start, timing = time.perf_counter(), {}
        variants, variants_record = self.variants(requests, pool)
        fit, key_a, timing["A"] = self.stage_a(requests, variants, work_dir)
        edits = EditTable.from_fit(requests, variants, fit.vectors, fit.success)
        routing, key_bc, timing["BC"] = self.stage_bc(requests, pool, work_dir, variants)
        generator, timing["D"] = self._stage_d(edits, fit.spec, routing, f"{key_a}-{key_bc}", work_dir)
        timing["total_s"] = time.perf_counter() - start
        log.info("MeG fitted %d edits in %.0f s (A %.0f s, B+C %.0f s, D %.0f s)", len(requests), timing["total_s"],
                 *(timing[k]["seconds"] for k in ("A", "BC", "D")))
        record = {"n_edits": len(requests), "pool": pool_name, "n_pool": len(pool), "variants": variants_record,
                  "fit": fit.summary(),
                  "routing": routing["record"], "generator": generator.record, "timing": timing}
        record["fit"].pop("failed")
        return EditedModel(self.model, self.tokenizer, fit.spec, routing["encoder"], routing["encoder_record"],
                           routing["router"], generator, prompt_format=self.config.prompt_format,
                           config=self.config.to_dict(), record=record, sample_seed=self.config.seed,
                           fingerprint=self.fingerprint, edits=edits)

    def fit_part(self, requests: Sequence[EditRequest], work_dir: str | Path, pool: Sequence[EditRequest] | None = None,
                 pool_name: str | None = None) -> FitResult:
        """Stage A alone, in every rank of a torch.distributed group: each fits its part of the edits
        into the shared work_dir and, after the barrier, collects them all (rank 0 writes the result
        where `fit` with the same arguments finds it, and then goes on to stages B-D in `fit`)."""
        requests, pool, _ = self._inputs(requests, pool, pool_name)
        return self.stage_a(requests, self.variants(requests, pool)[0], Path(work_dir))[0]

    def with_subjects(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests, with a subject taken from the prompt where none is given (`infer_subjects`)."""
        return with_subjects(requests) if self.config.infer_subjects else list(requests)

    def _inputs(self, requests: Sequence[EditRequest], pool: Sequence[EditRequest] | None,
                pool_name: str | None) -> tuple[list[EditRequest], list[EditRequest], str]:
        """The edits with their subjects and the pool to fit with: the same in `fit` and in every rank's `fit_part`."""
        requests = self.with_subjects(requests)
        return (requests, *usable_pool(requests, pool, pool_name))

    # -- stage A: one fitted neuron vector per edit, on its prompt and other wordings ----------

    def variants(self, requests: Sequence[EditRequest], pool: Sequence[EditRequest]) -> tuple[list[tuple[str, ...]], dict]:
        """Each edit's other wordings (stages/variants.py) from the pool and the model's own
        context prefixes, and a record of what was built."""
        fit = self.config.fit
        wanted = fit.prefixes or fit.lone_prefixes
        prefixes = context_prefixes(self.model, self.tokenizer, fit.prefix_pool if wanted else 0,
                                    fit.prefix_tokens, self.config.seed, progress=self.progress)
        variants = build_variants(requests, pool_apart_from(pool, requests), prefixes, fit.paraphrases, fit.prefixes,
                                  fit.exclude_eval_templates, self.config.seed, fit.lone_prefixes)
        with_paraphrases = sum(any(not behind_prefix(v, r.prompt) for v in vs) for r, vs in zip(requests, variants))
        return variants, {"paraphrases": fit.paraphrases, "prefixes": fit.prefixes, "context_prefixes": prefixes,
                          "exclude_eval_templates": fit.exclude_eval_templates,
                          "edits_with_paraphrases": with_paraphrases,
                          "edits_with_subject_wording": sum(bool(relation_template(r.prompt, r.subject)) for r in requests),
                          "mean_wordings": 1 + sum(map(len, variants)) / max(1, len(variants))}

    def stage_a(self, requests, variants, work_dir: Path, starts: dict[str, torch.Tensor] | None = None):
        """Stage A on `requests` and their other wordings, cached in `work_dir`: (the FitResult,
        its cache key, its timing record). Adding edits to a pack runs it on the new edits alone,
        warm-started from the pack's vectors (`starts`, by target: fit_neurons)."""
        key = _digest({"model": self.fingerprint, "format": self.config.prompt_format,
                       "fit": dataclasses.asdict(self.config.fit), "edits": _records(requests),
                       **({"variants": variants} if any(variants) else {}),
                       **({"starts": {t: v.tolist() for t, v in sorted(starts.items())}} if starts else {})})
        folder = work_dir / "fit-neurons" / key
        path = folder / "vectors.safetensors"
        start, cached = time.perf_counter(), path.exists()
        if cached:
            log.info("stage A (fit neurons): done before, %s", folder)
            result = FitResult.load(path)
        else:
            log.info("stage A (fit neurons): fitting %d edits", len(requests))
            # shards are per edit, not per edit set: any edit set fitted in this work_dir reuses them
            result = fit_neurons(self.model, self.tokenizer, requests, get_format(self.config.prompt_format),
                                 self.config.fit, progress=self.progress, work_dir=work_dir / "fit-shards",
                                 variants=variants, processes=self.processes, starts=starts)
            if ranks()[0] == 0:  # in a group the ranks collect the same result; one writes it
                result.save(path)
        log.info("stage A: success %.1f%% of %d edits", result.success_rate, len(requests))
        return result, key, {"seconds": time.perf_counter() - start, "cached": cached,
                             "fit_s": result.timing.get("total_s"), "reused_edits": result.timing.get("reused_edits"),
                             "reused_s": result.timing.get("reused_s")}

    # -- stage B: the encoder tuned on the pool; stage C: router and its epsilon ---------------

    def _stage_b(self, train_pool, work_dir: Path):
        """The tuned encoder. It depends on the pool and the encoder settings, not on the edits,
        so fits of different edit sets in one work_dir with the same pool share it."""
        settings = self.config.routing.encoder
        key = _digest({"encoder": self.config.encoder, "training": dataclasses.asdict(settings), "pool": _records(train_pool)})
        path = work_dir / "encoder" / key / "encoder.safetensors"
        start, cached = time.perf_counter(), path.with_suffix(".json").exists()  # the record is written last
        if cached:
            log.info("stage B (encoder): done before, %s", path.parent)
            encoder, record = load_encoder_delta(path, self.base_encoder)
        else:
            log.info("stage B (encoder): tuning the encoder on %d pool records", len(train_pool))
            queries, paraphrases, negatives = training_triples(train_pool, settings)
            encoder, training = train_encoder(self.base_encoder, queries, paraphrases, settings, self.progress,
                                             checkpoint_dir=path.parent, negatives=negatives)  # a killed stage B resumes
            record = encoder_delta_record(training, self.config.encoder)
            write_encoder_delta(encoder, record, path)
        return encoder, record, {"seconds": time.perf_counter() - start, "cached": cached, "train_s": record["timing"]["total_s"]}

    def stage_bc(self, requests, pool, work_dir: Path, variants: Sequence[Sequence[str]] = ()):
        """Stages B and C on `requests` (and their other wordings), cached in `work_dir`: ({"encoder",
        "encoder_record", "router", "record"}, its cache key, its timing record)."""
        config = self.config.routing
        settings = dataclasses.asdict(config)
        # the question gate acts on queries after stage C: not part of its key, set on the router it gives
        gate = {k: settings["router"].pop(k) for k in ("question_gate", "question_gate_lone")}
        key = _digest({"encoder": self.config.encoder, "routing": settings,
                       "edits": [r.prompt for r in requests], "pool": _records(pool),
                       **({"wordings": [list(v) for v in variants]} if any(variants) else {})})
        folder = work_dir / "routing" / key
        done = folder / "routing.json"
        start = time.perf_counter()
        train_pool, calibration = split_for_edits(requests, pool, config)
        encoder, encoder_record, encoder_timing = self._stage_b(train_pool, work_dir)
        if done.exists():
            log.info("stage C (router): done before, %s", folder)
            router, record = Router.load(folder / "router.safetensors"), json.loads(done.read_text())
        else:
            log.info("stage C (router): %d edits, epsilon from %d pool records", len(requests), len(calibration))
            calibration_wordings = self.variants(calibration, pool)[0] if config.router.calibration_wordings else None
            router, record = fit_router(requests, encoder, train_pool, calibration, config, self.progress,
                                        wordings=variants, calibration_wordings=calibration_wordings)
            router.save(folder / "router.safetensors")
            atomic_write_json(done, record)  # written last: marks the stage done
        router = dataclasses.replace(router, config=dataclasses.replace(router.config, **gate))
        log.info("stages B+C: epsilon %.3f (%s router)", router.epsilon, router.config.kind)
        return ({"encoder": encoder, "encoder_record": encoder_record, "router": router, "record": record}, key,
                {"seconds": time.perf_counter() - start, "encoder": encoder_timing, "router_s": record["timing"]["router_s"]})

    # -- stage D: the generator -----------------------------------------------------------------

    def _stage_d(self, edits: EditTable, spec, routing: dict, upstream: str, work_dir: Path):
        config = self.config.generator
        key = _digest({"upstream": upstream, "generator": dataclasses.asdict(config)})
        folder = work_dir / "generator" / key
        path = folder / "generator.safetensors"
        start = time.perf_counter()
        if path.exists():
            log.info("stage D (generator): done before, %s", folder)
            generator = Generator.load(path)
        else:
            # the fitted edits' prompts first (the first ones validate), then, augmented, every other wording
            if not bool(edits.fitted.any()):
                raise ConfigError("stage D: no edit was fitted successfully in stage A; nothing to train on")
            conditions, owners = edits.pairs(range(len(edits)), config.augment, routing["encoder"], self.progress)
            n_ok = int(edits.fitted.sum())
            log.info("stage D (generator): training the %s generator on %d fitted edits (%d pairs)", config.kind,
                     n_ok, len(owners))
            validation = edits.requests(owners[: min(n_ok, config.validation_size)])
            generator = train_generator(conditions, edits.vectors[owners],
                                        config, work_dir=folder, progress=self.progress, n_edits=n_ok,
                                        validate=self.validation(spec, validation))
            generator.save(path)
        generator.to(next(self.model.parameters()).device)
        return generator, {"seconds": time.perf_counter() - start, "train_s": generator.record.get("seconds")}

    def validation(self, spec, requests: list[EditRequest]):
        """Reliability AG of the generated vectors on the validation edits' own prompts (a
        callback for train_generator: the first pairs it validates are these prompts, in order)."""
        requests = [dataclasses.replace(r, rephrases=(), locality=()) for r in requests]

        def validate(generated: torch.Tensor) -> dict:
            subject = vector_table_subject(self.model, self.tokenizer, spec, dict(zip((r.prompt for r in requests), generated)),
                                           lambda q: q.text, "validation")
            try:
                report = evaluate(subject, requests, prompt_format=self.config.prompt_format, progress=False,
                                  chat_edits=0)
            finally:
                subject.neuron.detach()
            return {"rel_ag": report.metrics["reliability"]["ag"]}

        return validate
