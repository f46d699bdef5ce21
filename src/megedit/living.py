"""Living edits: add edits to an edit pack, or remove some, without refitting it
(docs/living-edits.md).

Adding runs stage A on the new edits alone (the pack's own settings; their other wordings built
from a pool as a fit builds them), appends their prompts to the nearest router's bank (epsilon
kept unless recalibrated on a pool), and fine-tunes the generator from its saved weights on the
new edits' pairs with the old edits' pairs replayed beside them, so the old mappings are not
forgotten. Removing drops the edits' bank rows, which stops their prompts firing at once, and
fine-tunes the generator on the remaining edits. Either way the generator's budget follows the
edits changed, not the pack's size: `passes` over each changed edit, times 1 + `replay`.

The pack's edit table (edit_table.py) supplies the old edits' fitted vectors, wordings and their
embeddings (computed by the pack's encoder where the pack does not hold them). The entropy router
memorises its edit set, so it cannot change without being trained again: such packs are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import MeGConfig
from .data.demo import fallback_pool
from .data.requests import EditRequest, pool_apart_from
from .edit_table import EditTable
from .edited import EditedModel
from .editor import MeGEditor
from .errors import ConfigError, MeGError
from .settings import check_settings, setting
from .stages.generator import FineTune, Generator, train_generator
from .stages.router import Router, flat_wordings
from .stages.routing import edit_negatives, fit_router, split_for_edits

log = logging.getLogger(__name__)

GERUND = {"add": "adding", "remove": "removing"}


@dataclass
class AddConfig:
    passes: float | None = setting(None, above=0, help=(
        "generator passes over each added or removed edit (null: the pack's own, its generator's passes, else the "
        "steps x batch size per edit its fit trained)"))
    replay: float = setting(1.0, at_least=0, help=(
        "old edits' pairs drawn per new edits' pair while the generator is fine-tuned"))
    recalibrate: bool = setting(False, help=(
        "choose epsilon again on the pool (adding needs one then); else keep the pack's"))

    def validate(self) -> "AddConfig":
        return check_settings(self, "add config")


def add_edits(edited: EditedModel, requests: Sequence[EditRequest], work_dir: str | Path, *,
              pool: Sequence[EditRequest] | None = None, replace: bool = True, config: AddConfig | None = None,
              progress: bool = True, processes: int = 1) -> EditedModel:
    """`edited` with `requests` added, without a refit: stage A for them alone, their prompts added
    to the router, the generator fine-tuned on their pairs with the old edits' replayed. An edit
    whose case id or prompt the pack holds replaces it (`replace=False` refuses instead). `pool`:
    pseudo-edit records for the new edits' other wordings (and for `config.recalibrate`).
    `work_dir` caches the steps: a killed call resumes. `processes`: stage A's forked one-thread
    CPU processes (megedit.parallel). The returned model takes over the base model; `edited` is
    closed."""
    config, table = (config or AddConfig()).validate(), _editable(edited, "add")
    requests = _checked(requests)
    replaced = table.rows_matching(requests)
    if replaced and not replace:
        raise ConfigError(f"add: the pack already holds {', '.join(repr(table.case_ids[i]) for i in replaced)} "
                          f"(same case id or prompt); pass replace=True to replace them")
    if config.recalibrate and not pool:
        raise ConfigError("add: recalibrate needs a pseudo-edit pool to choose epsilon on")
    if replaced:
        log.info("add: replacing %d edits the pack holds (same case id or prompt; the later fact wins): %s",
                 len(replaced), ", ".join(table.case_ids[i] for i in replaced))
    start, editor = time.perf_counter(), _editor(edited, progress, processes)
    requests = editor.with_subjects(requests)
    with _handed_over(edited):
        new, fit_record = _fit_new(editor, edited, requests, pool, Path(work_dir))
        kept = sorted(set(range(len(table))) - set(replaced))
        edits = table.select(kept) + new
        router = _router(edited, edits, kept, new, pool if config.recalibrate else None, editor.config, progress)
        router = _with_new_negatives(router, edited, requests, pool, editor.config, config.recalibrate)
        generator, tuned = _tune(edited, editor, edits, range(len(kept), len(edits)), int(new.fitted.sum()), config,
                                 Path(work_dir), progress)
    entry = {"op": "add", "ids": [r.case_id for r in requests], "replaced": [table.case_ids[i] for i in replaced],
             "fit": fit_record, "recalibrated": config.recalibrate}
    return _successor(edited, edits, router, generator, _history(entry, len(table), edits, router, tuned, start))


def remove_edits(edited: EditedModel, ids: Sequence[str], work_dir: str | Path, *, config: AddConfig | None = None,
                 progress: bool = True) -> EditedModel:
    """`edited` without the edits of these case ids: their router rows dropped (their prompts stop
    firing), the generator fine-tuned on the remaining edits. As `add_edits`, the returned model
    takes over the base model."""
    config, table = (config or AddConfig()).validate(), _editable(edited, "remove")
    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        raise ConfigError("remove: no edit ids given")
    unknown = sorted(set(ids) - set(table.case_ids), key=ids.index)
    if unknown:
        shown = ", ".join(table.case_ids[:8]) + (", ..." if len(table) > 8 else "")
        raise ConfigError(f"remove: no edit with id {', '.join(map(repr, unknown))} in the pack "
                          f"(its {len(table)} ids: {shown})")
    gone = set(table.rows_of(ids))
    if len(gone) == len(table):
        raise ConfigError(f"remove: that is all {len(table)} edits of the pack; an edit pack needs at least one "
                          f"(the base model alone is the pack without edits)")
    kept = [i for i in range(len(table)) if i not in gone]
    start, editor = time.perf_counter(), _editor(edited, progress)
    with _handed_over(edited):
        edits = table.select(kept)
        router = edited.router.with_edits(kept, torch.zeros(0, edited.router.bank.shape[1]))
        generator, tuned = _tune(edited, editor, edits, (), len(gone), config, Path(work_dir), progress)
    log.info("remove: %d edits removed, %d left", len(gone), len(edits))
    entry = {"op": "remove", "ids": ids}
    return _successor(edited, edits, router, generator, _history(entry, len(table), edits, router, tuned, start))


# -- checks -------------------------------------------------------------------------------------


def _editable(edited: EditedModel, verb: str) -> EditTable:
    """The pack's edit table, once the pack is known to be one whose edits can change."""
    if edited.edits is None:
        raise ConfigError(f"{verb}: this pack does not list its edits (it was written before packs did); "
                          f"refit it to change its edits")
    if edited.router.bank is None:
        raise ConfigError(f"{verb}: this pack's router is the entropy net, which memorises its edit set: "
                          f"{GERUND[verb]} edits means training it again; refit the pack (the nearest router takes "
                          f"added and removed edits)")
    if not edited.neuron.attached:
        raise ConfigError(f"{verb}: this EditedModel is closed: an earlier add or remove handed its base model to "
                          f"the model it returned; use that one")
    return edited.edits


def _checked(requests: Sequence[EditRequest]) -> list[EditRequest]:
    requests = list(requests)
    if not requests:
        raise ConfigError("add: no edit requests")
    twice = [i for i, n in Counter(r.case_id for r in requests).items() if n > 1]
    if twice:
        raise ConfigError(f"add: case id {twice[0]!r} is given twice among the new edits")
    return requests


def _editor(edited: EditedModel, progress: bool, processes: int = 1) -> MeGEditor:
    """A MeGEditor with the pack's own settings on its base model (for stage A and validation); the neuron's
    quiet opening as the pack's spec says (packs from before the setting fitted without it)."""
    config = MeGConfig.from_dict(edited.config, where="the pack's config")
    config = dataclasses.replace(config, fit=dataclasses.replace(config.fit, quiet_chat_opening=edited.spec.quiet_opening))
    return MeGEditor(edited.model, edited.tokenizer, config, progress=progress, processes=processes)


@contextmanager
def _handed_over(edited: EditedModel) -> Iterator[None]:
    """The pack's neuron off the base model while stage A and the generator's validation attach
    their own at its layer; put back if anything fails, so the pack is then as it was. On success
    it stays off: the model returned attaches its own."""
    edited.neuron.detach()
    try:
        yield
    except BaseException:
        edited.neuron.attach()
        raise


# -- the parts ----------------------------------------------------------------------------------


def _fit_new(editor: MeGEditor, edited: EditedModel, requests: list[EditRequest], pool, work_dir: Path):
    """Stage A on the new edits, their other wordings built from the pool as a fit builds them
    (the pack's edits left out of it, as a fit leaves out its own): (their table rows, a record)."""
    if not pool and editor.config.fit.paraphrases:
        log.warning("add: no pseudo-edit pool given: the new edits get no pool paraphrases, so they may carry less "
                    "well to paraphrases than the pack's")
    variants, variants_record = editor.variants(requests, pool_apart_from(pool or (), edited.edits.requests()))
    fit, _, timing = editor.stage_a(requests, variants, work_dir, _starts(edited.edits, requests))
    if fit.spec != edited.spec:  # the pack's settings should give its own neuron back; anything else is no edit of it
        raise MeGError(f"add: stage A fitted a {fit.spec.variant} neuron at layer {fit.spec.layer}, the pack's is a "
                       f"{edited.spec.variant} neuron at layer {edited.spec.layer}")
    failed = fit.summary()["failed"]
    if failed:
        log.warning("add: stage A did not fit %d of the new edits (%s): the router takes them, the generator does "
                    "not learn them", len(failed), ", ".join(failed[:8]))
    record = {"success_rate": fit.success_rate, "failed": failed, "mean_wordings": variants_record["mean_wordings"],
              "seconds": timing["seconds"]}
    return EditTable.from_fit(requests, variants, fit.vectors, fit.success), record


def _starts(table: EditTable, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
    """The pack's fitted vector for each new edit's target that a fitted pack edit has (its first such
    edit): stage A warm-starts from them, as it does from an earlier edit of a block."""
    wanted, starts = {r.target for r in requests}, {}
    for target, vector, ok in zip(table.targets, table.vectors, table.fitted.tolist()):
        if ok and target in wanted:
            starts.setdefault(target, vector)
    return starts


def _router(edited: EditedModel, edits: EditTable, kept: list[int], new: EditTable, pool, meg: MeGConfig,
            progress: bool) -> Router:
    """The pack's router on the kept edits' rows and the new prompts at its epsilon; with a pool,
    epsilon chosen again on it the way a fit chooses it."""
    if pool is None:
        texts, owners = flat_wordings(new.wordings)
        wordings = edited.encoder.encode(texts) if texts and edited.router.wordings is not None else None
        return edited.router.with_edits(kept, edited.encoder.encode(new.prompts), wordings, owners)
    requests = edits.requests()
    train_pool, calibration = split_for_edits(requests, pool, meg.routing)
    router, _ = fit_router(requests, edited.encoder, train_pool, calibration, meg.routing, progress,
                           wordings=edits.wordings)
    log.info("add: epsilon %.3f -> %.3f (recalibrated)", edited.router.epsilon, router.epsilon)
    return router


def _with_new_negatives(router: Router, edited: EditedModel, requests: list[EditRequest], pool, meg: MeGConfig,
                        recalibrated: bool) -> Router:
    """The router with the new edits' negatives added (a recalibrated router has every edit's already),
    built from the pool or, without one, from megedit's fallback pool; the pack's negatives that
    would hold back a new edit's queries go (Router.with_negatives)."""
    if recalibrated or router.bank is None:
        return router
    negatives, margins = edit_negatives(requests, pool_apart_from(pool or fallback_pool(), requests), meg.routing)
    embeddings = edited.encoder.encode(negatives) if negatives else router.bank.new_zeros(0, router.bank.shape[1])
    return router.with_negatives(embeddings, range(len(router.bank) - len(requests), len(router.bank)), margins)


def _tune(edited: EditedModel, editor: MeGEditor, edits: EditTable, new_rows: Sequence[int], changed: int,
          config: AddConfig, work_dir: Path, progress: bool) -> tuple[Generator, dict]:
    """The generator fine-tuned from its weights for `changed` edits' worth of passes, drawing the
    new rows' pairs and the others' at 1 : replay (only the others' when no row is new); kept as
    it is when nothing changed or no fitted edit is left. Cached in `work_dir` (a killed run resumes)."""
    generator, new_rows, start = edited.generator, set(new_rows), time.perf_counter()
    passes = _passes(edited, config)
    if not changed or not bool(edits.fitted.any()):
        log.info("generator: nothing to learn or unlearn; kept as it is")
        return generator, {"steps": 0, "passes": passes}
    # every pair's condition embedding: the pack's own where it stored them, the encoder's for the rest
    conditions, owners = edits.pairs(sorted(new_rows) + [i for i in range(len(edits)) if i not in new_rows],
                                     generator.config.augment, edited.encoder, progress)
    is_new = torch.tensor([o in new_rows for o in owners])
    weights, replay = _draws(is_new, config.replay)
    # a kind that trains nothing (the lookup) is rebuilt from the pairs
    steps = 0 if not generator.kind.trains else max(1, math.ceil(passes * changed * (1 + replay)
                                                                          / generator.config.batch_size))
    fine_tune = FineTune(generator, steps, weights)
    folder = work_dir / "generator-tune" / _key(edited.fingerprint, edits, fine_tune)
    path = folder / "generator.safetensors"
    if path.exists():
        log.info("generator fine-tune: done before, %s", folder)
        tuned = Generator.load(path)
    else:
        # a lookup keeps every old pair's vector as it was: only the new pairs need validating
        n_ok = int(edits.fitted.sum())
        n_val = min(n_ok, generator.config.validation_size)
        if not generator.kind.trains and bool(is_new.any()):
            n_val = min(n_val, int(is_new.sum()))
        validate = editor.validation(edited.spec, edits.requests(owners[:n_val]))
        tuned = train_generator(conditions, edits.vectors[owners], work_dir=folder,
                                progress=progress, n_edits=n_ok, validate=validate, fine_tune=fine_tune)
        tuned.save(path)
    return tuned.to(next(edited.model.parameters()).device), {
        "steps": fine_tune.steps, "passes": passes, "replay": replay, "n_pairs": len(owners),
        "new_pairs": int(is_new.sum()), "seconds": time.perf_counter() - start}


def _draws(is_new: torch.Tensor, replay: float) -> tuple[torch.Tensor, float]:
    """Draw weights of the pairs, new ones and old ones at 1 : replay whatever their counts (each
    pair of a group equally likely), and the replay ratio that holds (0 when a group is empty)."""
    n_new, n_old = int(is_new.sum()), int((~is_new).sum())
    if not n_new or not n_old:
        return torch.ones(len(is_new)), 0.0
    return torch.where(is_new, 1.0 / n_new, replay / n_old), replay


def _passes(edited: EditedModel, config: AddConfig) -> float:
    """Generator passes over each changed edit: the config's, else the pack generator's, else the
    steps x batch size per fitted edit its fit trained with (a budget given in steps)."""
    g = edited.generator.config
    if config.passes is not None:
        return config.passes
    if g.passes is not None:
        return g.passes
    fitted = edited.record.get("generator", {}).get("n_edits") or max(1, int(edited.edits.fitted.sum()))
    return g.train_steps * g.batch_size / fitted


def _key(fingerprint: str, edits: EditTable, fine_tune: FineTune) -> str:
    """The fine-tune's cache folder: the base model, the edits and their vectors, the start and the draws."""
    h = hashlib.sha256(json.dumps([fingerprint, edits.case_ids, edits.prompts, edits.targets, edits.wordings,
                                   dataclasses.asdict(fine_tune.generator.config)]).encode())
    h.update(edits.vectors.float().numpy().tobytes())
    h.update(fine_tune.digest().encode())
    return h.hexdigest()[:16]


# -- the result ---------------------------------------------------------------------------------


def _history(entry: dict, n_before: int, edits: EditTable, router: Router, generator: dict, start: float) -> dict:
    """One entry of the pack's history (pack.json): what changed, when, the counts, the cost."""
    return {"op": entry["op"], "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry,
            "n_before": n_before, "n_after": len(edits), "epsilon": router.epsilon, "generator": generator,
            "seconds": time.perf_counter() - start}


def _successor(edited: EditedModel, edits: EditTable, router: Router, generator: Generator, entry: dict) -> EditedModel:
    """The changed pack on the same base model, with the change in its history."""
    successor = EditedModel(edited.model, edited.tokenizer, edited.spec, edited.encoder, edited.encoder_record, router,
                            generator, prompt_format=edited.prompt_format, config=edited.config,
                            record={**edited.record, "n_edits": len(edits)}, sample_seed=edited.sample_seed,
                            fingerprint=edited.fingerprint, edits=edits, history=[*edited.history, entry])
    successor.max_prompt_tokens = edited.max_prompt_tokens
    return successor
