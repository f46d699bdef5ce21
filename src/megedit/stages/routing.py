"""Stages B and C together: tune the encoder on the pseudo-edit pool, then train and calibrate
the router on the edits, and measure both (paraphrase retrieval, routing of each query kind).

The pool is split once (seeded): a calibration slice the encoder never trains on, so that its
paraphrases are as new to the encoder as the edits' paraphrases will be, and the rest for the
encoder's InfoNCE training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..data.requests import EditRequest, pool_apart_from
from ..data.specificity import RelationWordings, negative_groups, relation_wordings
from ..errors import ConfigError
from ..models import SentenceEncoder
from ..settings import check_settings, setting
from .encoder import EncoderConfig, EncoderTraining, retrieval_top1, train_encoder, training_triples
from .router import (Router, RouterConfig, epsilon_curve, flat_wordings, route_stats, router_kind, separation_auroc,
                     train_router)

log = logging.getLogger(__name__)


@dataclass
class RoutingConfig:
    encoder: EncoderConfig = setting(default_factory=EncoderConfig, help="stage B: tuning the sentence encoder")
    router: RouterConfig = setting(default_factory=RouterConfig, help="stage C: the router")
    calibration_size: int = setting(512, at_least=0, help=(
        "pool records held out of encoder training for the epsilon calibration"))
    seed: int = setting(0, help="the pool split and the negatives' draw")

    def validate(self) -> "RoutingConfig":
        self.encoder.validate()
        self.router.validate()
        return check_settings(self, "routing config")

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingConfig":
        return cls(EncoderConfig(**d.get("encoder", {})), RouterConfig(**d.get("router", {})),
                   **{k: v for k, v in d.items() if k not in ("encoder", "router")})


def split_pool(pool: Sequence[EditRequest], calibration_size: int, seed: int) -> tuple[list, list]:
    """(encoder-training records, calibration records); only records with a rephrase are used.
    The calibration slice is a seeded sample of at most a quarter of the usable pool."""
    usable = [r for r in pool if r.rephrases]
    if len(usable) < 8:
        raise ConfigError(f"pseudo-edit pool: need at least 8 records with a rephrase, found {len(usable)}")
    k = min(calibration_size, len(usable) // 4)
    picked = set(torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return ([r for i, r in enumerate(usable) if i not in picked], [r for i, r in enumerate(usable) if i in picked])


def split_for_edits(edits: Sequence[EditRequest], pool: Sequence[EditRequest],
                    config: RoutingConfig) -> tuple[list, list]:
    """(encoder-training records, calibration records) of the pool, leaving out every record that
    shares an id or a prompt with an edit."""
    return split_pool(pool_apart_from(pool, edits), config.calibration_size, config.seed)


def calibration_embeddings(encoder: SentenceEncoder, calibration: Sequence[EditRequest],
                           train_pool: Sequence[EditRequest], edit_prompts: Sequence[str] = ()
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompts, first rephrases, unrelated queries) of the calibration records. Unrelated: their
    own locality queries, less any that is a pool record's or an edit's prompt (the calibration
    mirror holds those, so they would count as false fire at any epsilon); a pool without such
    queries offers the prompts of encoder-training records instead (unrelated to the edits and to
    the slice)."""
    mirrored = {*edit_prompts, *(r.prompt for r in calibration)}
    prompts = mirrored | {r.prompt for r in train_pool}
    unrelated = [q.prompt for r in calibration for q in r.locality[:1] if q.prompt not in prompts]
    unrelated = unrelated or [r.prompt for r in train_pool if r.prompt not in mirrored][: len(calibration)]
    return (encoder.encode([r.prompt for r in calibration]), encoder.encode([r.rephrases[0] for r in calibration]),
            encoder.encode(unrelated))


@dataclass
class Routing:
    """The tuned encoder, the router, and the record of how both were made."""

    encoder: SentenceEncoder
    router: Router
    encoder_training: EncoderTraining
    record: dict


def fit_router(edits: Sequence[EditRequest], tuned: SentenceEncoder, train_pool: Sequence[EditRequest],
               calibration: Sequence[EditRequest], config: RoutingConfig, progress: bool = True,
               wordings: Sequence[Sequence[str]] | None = None,
               calibration_wordings: Sequence[Sequence[str]] | None = None) -> tuple[Router, dict]:
    """Stage C: the router on the edits' prompts, epsilon from the calibration slice; and its record.
    A nearest router also holds each edit's other `wordings` (stage A's variants) and its negatives.
    With `config.router.calibration_wordings`, the calibration mirror holds the edits' wordings and
    the calibration records' own (`calibration_wordings`, built as the edits' are)."""
    start = time.perf_counter()
    texts, owners = flat_wordings(wordings or [])
    holds_wordings = router_kind(config.router.kind).holds_wordings
    embedded = tuned.encode(texts, progress=progress) if texts and holds_wordings else None
    router = train_router(tuned.encode([r.prompt for r in edits], progress=progress), config.router,
                          calibration=calibration_embeddings(tuned, calibration, train_pool, [r.prompt for r in edits]),
                          mirror_wordings=_mirror_wordings(tuned, embedded, owners, len(edits), calibration_wordings,
                                                           config.router, progress),
                          progress=progress)
    negatives, margins = ([], None) if router.bank is None else edit_negatives(edits, [*train_pool, *calibration],
                                                                                config)
    if negatives:
        router = router.with_negatives(tuned.encode(negatives, progress=progress), margins=margins)
    if embedded is not None and router.bank is not None:
        router = router.with_wordings(embedded, owners)
    return router, {"config": asdict(config), "query_text": "raw prompts (no LM wrapping)", "n_edits": len(edits),
                    "n_pool": len(train_pool) + len(calibration), "n_encoder_pool": len(train_pool),
                    "n_calibration": len(calibration), "n_negatives": len(negatives),
                    "timing": {"router_s": time.perf_counter() - start}}


def _mirror_wordings(tuned: SentenceEncoder, embedded, owners: list[int], n_edits: int,
                     calibration_wordings, config, progress: bool):
    """The other wordings the calibration mirror holds, or None (config.calibration_wordings off)."""
    if not config.calibration_wordings:
        return None
    texts, rows = flat_wordings(calibration_wordings or [])
    parts = ([embedded] if embedded is not None else []) + ([tuned.encode(texts, progress=progress)] if texts else [])
    if not parts:
        return None
    return torch.cat(parts), [*(owners if embedded is not None else []), *(n_edits + r for r in rows)]


def edit_negatives(edits: Sequence[EditRequest], pool: Sequence[EditRequest], config: RoutingConfig,
                   wordings: RelationWordings | None = None) -> tuple[list[str], torch.Tensor]:
    """Every edit's negatives (data/specificity.py) as one list of distinct prompts, and each one's own
    margin: `other_relation_margin` for a prompt of another relation, `plain_margin` for a plain one,
    plus `unknown_relation_margin` where the edit asks a relation the pool does not know (its "other
    relations" may hold the edit's own in other words); a prompt drawn for several edits keeps the smallest.
    `wordings`: the pool's relation wordings, when the caller has them (or another view of them)."""
    router, wordings = config.router, wordings or relation_wordings(pool)
    groups = negative_groups(edits, pool, router.negatives, router.plain_negatives, config.seed,
                             router.same_relation_negatives, wordings, router.negative_wordings)
    margins: dict[str, float] = {}
    for request, kinds in zip(edits, groups):
        unknown = 0.0 if wordings.of(request) else router.unknown_relation_margin
        for kind, prompts in kinds.items():
            margin = unknown + {"other": router.other_relation_margin, "plain": router.plain_margin}.get(kind, 0.0)
            for p in prompts:
                margins[p] = min(margins.get(p, margin), margin)
    return list(margins), torch.tensor(list(margins.values()))


def fit_routing(edits: Sequence[EditRequest], pool: Sequence[EditRequest], encoder: SentenceEncoder,
                config: RoutingConfig | None = None, progress: bool = True) -> Routing:
    """Stage B (encoder on the pool) then stage C (router on the edits, epsilon from the pool)."""
    config = config or RoutingConfig()
    train_pool, calibration = split_for_edits(edits, pool, config)
    queries, paraphrases, negatives = training_triples(train_pool, config.encoder)
    tuned, training = train_encoder(encoder, queries, paraphrases, config.encoder, progress, negatives=negatives)
    router, record = fit_router(edits, tuned, train_pool, calibration, config, progress)
    record["timing"] |= {"encoder_s": training.timing["total_s"],
                         "total_s": training.timing["total_s"] + record["timing"]["router_s"]}
    return Routing(tuned, router, training, record)


def routing_report(routing: Routing, base_encoder: SentenceEncoder, edits: Sequence[EditRequest]) -> dict:
    """How well stages B and C do on these edits' own queries (evaluation only; nothing here
    feeds back into training or calibration): paraphrase retrieval among the edit prompts with
    the frozen and the tuned encoder, and the share of each query kind routed familiar."""
    scored = [r for r in edits if r.rephrases]
    prompts, rephrases = [r.prompt for r in scored], [r.rephrases[0] for r in scored]
    locality = [q.prompt for r in edits for q in r.locality[:1]]
    groups = {"prompt": routing.encoder.encode([r.prompt for r in edits]),
              "rephrase": routing.encoder.encode(rephrases), "locality": routing.encoder.encode(locality)}
    return {
        "retrieval_top1": {"frozen": retrieval_top1(base_encoder, prompts, rephrases),
                           "tuned": retrieval_top1(routing.encoder, prompts, rephrases), "n": len(scored)},
        "encoder_losses": routing.encoder_training.losses,
        "epsilon": routing.router.epsilon,
        "router_record": routing.router.record,
        "auroc_rephrase_vs_locality": separation_auroc(routing.router.distance(groups["rephrase"]),
                                                       routing.router.distance(groups["locality"])),
        "routing": route_stats(routing.router, groups),
        "curve": epsilon_curve(routing.router.distance(groups["rephrase"]), routing.router.distance(groups["locality"]),
                               routing.router.config.max_distance),
        "distances": {name: routing.router.distance(emb).cpu().tolist() for name, emb in groups.items()},
    }
