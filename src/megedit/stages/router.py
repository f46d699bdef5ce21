"""Stage C: the familiarity router, which lets the neuron fire only for queries near an edit.

Each kind gives a query a distance (small = familiar; `distance < epsilon` fires), one file each:
the paper's "entropy" net (router_entropy.py) and the "nearest" edit wording (router_nearest.py).

Epsilon is calibrated without the test queries: a mirror router is built on the edit prompts plus
a held-out slice of the pseudo-edit pool; the distances of that slice's paraphrases (which the
mirror never saw) stand for the edits' paraphrases, those of the slice's unrelated (locality)
queries for unrelated traffic. The threshold that best separates the two (recall - false fire), under
a ceiling on the false fire, is used for the real router, built on the edits alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..io import atomic_save_tensors, atomic_write_json, load_tensors, read_record
from ..settings import check_settings, setting
from .router_entropy import EntropyKind, FamiliarityNet
from .router_nearest import NearestKind

log = logging.getLogger(__name__)


# the router kinds by name, the one place a name meets its code: adding a kind is one file with a
# class like EntropyKind or NearestKind, and one entry here
ROUTER_KINDS = {"entropy": EntropyKind(), "nearest": NearestKind()}


def router_kind(name: str) -> EntropyKind | NearestKind:
    if name not in ROUTER_KINDS:
        raise ConfigError(f"router kind must be one of {', '.join(ROUTER_KINDS)}, found {name!r}")
    return ROUTER_KINDS[name]


@dataclass
class RouterConfig:
    kind: str = setting("nearest", choices=ROUTER_KINDS, help=(
        "nearest: 1 - cosine to the nearest edit wording; entropy: the paper's net (module docstring, "
        "bench/routing.py)"))
    classes: int = setting(10, at_least=2, help="entropy: K random labels, far below the number of edits")
    blocks: int = setting(5, at_least=0, help="entropy: residual blocks of the net")
    expansion: int = setting(4, at_least=1, help="entropy: hidden width of a block, in multiples of the input's")
    dropout: float = setting(0.1, at_least=0, below=1, help="entropy: dropout in each block")
    lr: float = setting(1e-3, above=0, help="entropy: AdamW's learning rate")
    weight_decay: float = setting(0.01, at_least=0, help="entropy: AdamW's weight decay")
    batch_size: int = setting(256, at_least=1, help="entropy: edit prompts per step")
    max_epochs: int = setting(1000, at_least=1, help="entropy: passes over the edit prompts at most")
    fit_entropy: float = setting(0.01, at_least=0, help="entropy: stop once the edit queries' mean entropy is below this")
    seed: int = setting(0, help="entropy: the labels and the net's initial weights")
    epsilon: float | None = setting(None, help=(
        "a query fires when its distance is below this (in (0, 2] for nearest, (0, ln classes] for entropy); "
        "null: calibrate on the pseudo-edit pool"))
    # Balanced thresholds sit at 3-10% false fire up to 4,096 CounterFact / ZsRE edits but at 22.5% at 10,000,
    # where each false fire can break an unrelated answer: the ceiling bounds that loss (docs/results.md)
    max_false_fire: float | None = setting(20.0, at_least=0, at_most=100, help=(
        "calibration: false fire (percent) at most this; null: no ceiling"))
    false_fire_weight: float = setting(1.0, above=0, at_most=100, help=(
        "calibration: epsilon maximises recall - this x false fire; below 1 favours reaching paraphrases"))
    negatives: int | None = setting(None, at_least=0, help=(
        "nearest: other relations per edit whose prompts about its subject (the pool's negative-half wordings) are "
        "negatives, where it must not fire: a query nearer to one of them than to every edit wording does not fire; "
        "null: every other relation"))
    # every wording: questions near the edit's own ("X was born in" for a language edit) fire 2.5-5x less often
    # (bench/real_use_levers.py wordings); the margin keeps the edit's paraphrases firing
    negative_wordings: int | None = setting(None, at_least=1, help=(
        "nearest: wordings per other relation among an edit's negatives; null: every negative-half wording"))
    other_relation_margin: float = setting(0.05, at_least=0, at_most=2, help=(
        "nearest: added to negative_margin for the other-relation negatives (not the plain or same-relation ones)"))
    plain_negatives: int = setting(2, at_least=0, help='nearest: plain prompts about the subject per edit '
                                   '("Tell me about X.")')
    plain_margin: float = setting(0.0, at_least=0, at_most=2, help=(
        "nearest: added to negative_margin for the plain negatives (a terse question about the subject lies "
        "near them though it asks the edit's relation)"))
    same_relation_negatives: int = setting(16, at_least=0, help=(
        "nearest: pool prompts asking the edit's relation about other subjects, per edit (locality: a query "
        "about another subject is held back by its like)"))
    negative_margin: float = setting(0.0, at_least=-1, at_most=2, help=(
        "nearest: a negative holds a query back when its cosine is at least the wording's + this"))
    unknown_relation_margin: float = setting(0.02, at_least=0, at_most=2, help=(
        "nearest: added to negative_margin for the negatives of an edit whose relation the pool does not know "
        "(a question of its own: one of them may ask it in other words)"))
    # chosen on the first 1,024 counterfact-edit.json edits (bench/real_use_levers.py gate): free-form questions
    # about an edit's subject fire it 18% of the time, 4% with the gate, and no rephrase is lost; the same edits
    # with their prompt alone keep all but 1.6 points of rephrases at 0.2 (docs/method.md#the-question-gate)
    question_gate: float | None = setting(0.4, at_least=-1, at_most=1, help=(
        "nearest: a query that names its edit's subject fires only when its question (the subject masked) has "
        "at least this cosine to one of the edit's own (stages/question_gate.py); null: no gate"))
    question_gate_lone: float | None = setting(0.2, at_least=-1, at_most=1, help=(
        "nearest: question_gate for an edit whose only question is its prompt (no paraphrase wordings); null: "
        "question_gate"))
    calibration_wordings: bool = setting(False, help=(
        "calibration: the mirror router holds every wording (the edits' other wordings and the calibration "
        "records' own), as the deployed router holds the edits'; false: prompts only"))

    @property
    def max_distance(self) -> float:
        return router_kind(self.kind).max_distance(self)

    def validate(self) -> "RouterConfig":
        check_settings(self, "router config")
        if self.epsilon is not None and not 0 < self.epsilon <= self.max_distance:
            raise ConfigError(f"router config: epsilon must be in (0, {self.max_distance:.3f}] for the {self.kind} "
                              f"router, got {self.epsilon}")
        return self


def epsilon_curve(familiar: torch.Tensor, unrelated: torch.Tensor, max_distance: float, points: int = 400) -> list[dict]:
    """Recall (familiar distances below epsilon) and false fire (unrelated ones below it), in
    percent, over a grid of epsilon from 0 to the largest possible distance."""
    rows = []
    for eps in torch.linspace(0, max_distance, points + 1)[1:].tolist():
        rows.append({"epsilon": eps, "recall": 100.0 * float((familiar < eps).float().mean()),
                     "false_fire": 100.0 * float((unrelated < eps).float().mean())})
    return rows


def separation_auroc(familiar: torch.Tensor, unrelated: torch.Tensor) -> float:
    """Chance that a random familiar query is nearer than a random unrelated one (ties count half):
    1 separates perfectly at some epsilon, 0.5 is no better than a coin."""
    f, u = familiar.flatten().cpu().double(), unrelated.flatten().cpu().double()
    if not len(f) or not len(u):
        return float("nan")
    below = sum(float((fc[:, None] < u[None]).sum() + 0.5 * (fc[:, None] == u[None]).sum()) for fc in f.split(1024))
    return below / (len(f) * len(u))


def choose_epsilon(curve: list[dict], max_false_fire: float | None = None, false_fire_weight: float = 1.0) -> dict:
    """The curve row to use: the best recall - weight x false fire among rows whose false fire is
    within the ceiling (all rows without one); ties go to the smaller epsilon (the safer side)."""
    allowed = [r for r in curve if max_false_fire is None or r["false_fire"] <= max_false_fire]
    if not allowed:
        log.warning("router calibration: no epsilon keeps false fire within %s%%; using the smallest, %.3f",
                    max_false_fire, curve[0]["epsilon"])
        return curve[0]
    gain = [r["recall"] - false_fire_weight * r["false_fire"] for r in allowed]
    return allowed[gain.index(max(gain))]


@dataclass
class Router:
    """A familiarity router: the entropy net or the bank of edit-prompt embeddings, its threshold,
    and how the threshold was chosen."""

    config: RouterConfig
    epsilon: float
    net: FamiliarityNet | None = None  # kind "entropy"
    bank: torch.Tensor | None = None  # kind "nearest": the edit prompts' normalised embeddings, (N, dim)
    record: dict = field(default_factory=dict)  # training record and the calibration (curve, choice)
    negatives: torch.Tensor | None = None  # kind "nearest": where no edit fires, normalised embeddings (M, dim)
    negative_margins: torch.Tensor | None = None  # (M,): each negative's own margin on top of negative_margin
    # kind "nearest": the edits' other wordings (stage A's variants), normalised (W, dim), and their edits' rows (W,)
    wordings: torch.Tensor | None = None
    wording_edits: torch.Tensor | None = None
    # (M,): each negative's largest cosine to the bank and wordings, once asked for; kept up to date as edits join,
    # so that adding one edit to a pack compares its negatives with its own keys, not with every key
    negative_reach: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # margins go with negatives: none without them, zeros for a pack saved before negatives had margins
        if self.negatives is None:
            self.negative_margins = None
        elif self.negative_margins is None:
            self.negative_margins = self.negatives.new_zeros(len(self.negatives))

    @classmethod
    def build(cls, edit_embeddings: torch.Tensor, config: RouterConfig, epsilon: float, progress: bool = True,
              desc: str = "training router") -> "Router":
        """A router of `config.kind` over these edit prompts (training the net for "entropy")."""
        return cls(config, epsilon, **router_kind(config.kind).build(edit_embeddings, config, progress, desc))

    def with_edits(self, keep: list[int], embeddings: torch.Tensor, wordings: torch.Tensor | None = None,
                   wording_edits: Sequence[int] = ()) -> "Router":
        """A nearest router whose bank is rows `keep` of this one's, then these new edit prompts'
        embeddings, at the same epsilon (adding or removing edits without a refit); the kept
        edits' wordings stay, the new edits' `wordings` (their rows among the new edits in
        `wording_edits`) join. The entropy net memorises its edit set, so it has no such change
        short of training it again. A negative goes with the edit it sits nearest (the one whose
        queries it holds back)."""
        if self.bank is None:
            raise ConfigError("router: the entropy router cannot take or drop edits without training it again")
        new = nn.functional.normalize(embeddings.detach().float().to(self.bank.device), dim=-1)
        bank = torch.cat([self.bank[torch.tensor(keep, dtype=torch.long)], new.reshape(-1, self.bank.shape[1])])
        every = list(keep) == list(range(len(self.bank)))  # edits join, none leaves: the negatives all stay
        kept = {"negatives": self.negatives, "negative_margins": self.negative_margins} if every else \
            self._negatives_nearest(keep)
        router = replace(self, bank=bank, record={**self.record, "training": {"n": len(bank), "seconds": 0.0}},
                         wordings=None, wording_edits=None, **kept, negative_reach=None)
        if self.wordings is not None:  # the kept edits' wordings, renumbered
            row = {old: k for k, old in enumerate(keep)}
            stays = [j for j, e in enumerate(self.wording_edits.tolist()) if e in row]
            router = router.with_wordings(self.wordings[stays], [row[e] for e in self.wording_edits[stays].tolist()])
        if every and self.negative_reach is not None:
            router.negative_reach = self._reach_with(new)
        if wordings is not None and len(wordings):
            router = router.with_wordings(wordings, [len(keep) + e for e in wording_edits])
        return router

    def with_wordings(self, embeddings: torch.Tensor, edits: Sequence[int]) -> "Router":
        """This router with more wordings of its edits (`edits[j]`: the bank row wording j belongs to)."""
        new = nn.functional.normalize(embeddings.detach().float().to(self.bank.device), dim=-1)
        owners = torch.as_tensor(list(edits), dtype=torch.long)
        reach = self._reach_with(new) if self.negative_reach is not None else None
        if self.wordings is None:
            return replace(self, wordings=new, wording_edits=owners, negative_reach=reach)
        return replace(self, wordings=torch.cat([self.wordings, new]), wording_edits=torch.cat([self.wording_edits, owners]),
                       negative_reach=reach)

    def with_negatives(self, embeddings: torch.Tensor, serve: Sequence[int] | None = None,
                       margins: torch.Tensor | None = None) -> "Router":
        """This router with these negatives' embeddings (and their own `margins`, default 0) added to
        its own. With `serve`, the bank rows they were built for (edits joining a pack): a negative
        holds back the queries of the edit it sits nearest, so a new one nearest another edit stays
        out (it would ask what that edit answers), and an old one nearest one of `serve` goes (likewise)."""
        new = nn.functional.normalize(embeddings.detach().float().to(self.bank.device), dim=-1)
        new_margins = new.new_zeros(len(new)) if margins is None else margins.float().to(new.device)
        new_reach = None
        if serve is None:
            old = {"negatives": self.negatives, "negative_margins": self.negative_margins, "negative_reach": None}
        else:
            serve = torch.as_tensor(list(serve), dtype=torch.long)
            new_reach, nearest = self._nearest(new)
            kept = torch.isin(nearest, serve)
            new, new_margins, new_reach = new[kept], new_margins[kept], new_reach[kept]
            old = self._negatives_apart_from(serve)
        if old["negatives"] is None:
            return replace(self, negatives=new, negative_margins=new_margins, negative_reach=None)
        reach = None if old["negative_reach"] is None else torch.cat([old["negative_reach"], new_reach])
        return replace(self, negatives=torch.cat([old["negatives"], new]),
                       negative_margins=torch.cat([old["negative_margins"], new_margins]), negative_reach=reach)

    def _negatives_nearest(self, rows: Sequence[int]) -> dict:
        """This router's negatives whose nearest edit is one of bank rows `rows`, and their margins."""
        if self.negatives is None or not len(self.negatives):
            return {"negatives": self.negatives, "negative_margins": self.negative_margins}
        kept = torch.isin(self._nearest(self.negatives)[1], torch.as_tensor(list(rows), dtype=torch.long))
        return {"negatives": self.negatives[kept], "negative_margins": self.negative_margins[kept]}

    def _negatives_apart_from(self, rows: torch.Tensor) -> dict:
        """This router's negatives whose nearest edit is none of bank rows `rows`, with their margins and
        reach: only the cosines to those rows' keys are new work once the reach is known."""
        if self.negatives is None or not len(self.negatives):
            return {"negatives": self.negatives, "negative_margins": self.negative_margins, "negative_reach": None}
        reach = self._reach()
        keys = [self.bank[rows]] + ([self.wordings[torch.isin(self.wording_edits, rows)]]
                                    if self.wordings is not None else [])
        # theirs and the reach come from different matrix products: a cosine within rounding of the reach is theirs
        kept = _max_cosine(self.negatives, torch.cat(keys)) < reach - 1e-6
        return {"negatives": self.negatives[kept], "negative_margins": self.negative_margins[kept],
                "negative_reach": reach[kept]}

    def _reach(self) -> torch.Tensor:
        """Each negative's largest cosine to the bank and wordings (computed once, then kept)."""
        if self.negative_reach is None or len(self.negative_reach) != len(self.negatives):
            self.negative_reach = self._nearest(self.negatives)[0]
        return self.negative_reach

    def _reach_with(self, keys: torch.Tensor) -> torch.Tensor:
        """The negatives' reach once these (normalised) keys join the bank or wordings."""
        return torch.maximum(self._reach(), _max_cosine(self.negatives, keys))

    @torch.no_grad()
    def distance(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B,) distance of each query from the edits: entropy, or 1 - cosine to the nearest edit prompt."""
        if self.net is not None:
            return self.net.entropy(embeddings.to(next(self.net.parameters()).device))
        return 1.0 - self._nearest(embeddings)[0]

    @torch.no_grad()
    def nearest_edit(self, embeddings: torch.Tensor) -> list[int | None]:
        """Per query, the bank row (the edits' order) of the nearest edit prompt; None throughout for the
        entropy router, which knows familiarity but not which edit."""
        return [None] * len(embeddings) if self.bank is None else self._nearest(embeddings)[1].tolist()

    def _nearest(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine to the nearest wording of an edit (its prompt or another wording), and that edit's
        bank row, per query (in chunks: the (B, N) similarity matrix of a large batch against 10,000
        edits would be big)."""
        queries = nn.functional.normalize(embeddings.to(self.bank.device, self.bank.dtype), dim=-1)
        if not len(queries):
            return queries.new_zeros(0), torch.zeros(0, dtype=torch.long)
        keys = self.bank if self.wordings is None else torch.cat([self.bank, self.wordings])
        owners = torch.arange(len(self.bank)) if self.wordings is None else torch.cat(
            [torch.arange(len(self.bank)), self.wording_edits])
        best = [(chunk @ keys.T).max(dim=1) for chunk in queries.split(1024)]
        return torch.cat([b.values for b in best]), owners[torch.cat([b.indices for b in best]).cpu()]

    def familiar(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Bool (B,): which queries should get a generated neuron (see `route`)."""
        return self.route(embeddings)[1]

    @torch.no_grad()
    def route(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, familiar) per query, on the CPU: familiar = near an edit (distance below epsilon)
        and nearer to one of its wordings than to every negative."""
        return self.route_to_edits(embeddings)[:2]

    @torch.no_grad()
    def route_to_edits(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
        """`route` and `nearest_edit` together, from one search of the edit wordings."""
        if self.net is not None:
            distance = self.distance(embeddings).cpu()
            return distance, distance < self.epsilon, [None] * len(embeddings)
        nearest, rows = self._nearest(embeddings)
        distance = (1.0 - nearest).cpu()
        return distance, (distance < self.epsilon) & ~self._held_back(embeddings, nearest), rows.tolist()

    @torch.no_grad()
    def nearest_negative(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the largest cosine to a negative less that negative's own margin, and which negative
        it is (its row in `negatives`); kind "nearest" with negatives only."""
        queries = nn.functional.normalize(embeddings.to(self.bank.device, self.bank.dtype), dim=-1)
        margins = self.negative_margins.to(queries.device)
        best = [(chunk @ self.negatives.T - margins).max(dim=1) for chunk in queries.split(1024)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    def _held_back(self, embeddings: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Bool (B,): queries whose nearest negative's cosine (less its margin) is at least `nearest` (their
        nearest wording's) plus the configured margin."""
        if self.negatives is None or not len(self.negatives) or not len(embeddings):
            return torch.zeros(len(embeddings), dtype=torch.bool)
        return (self.nearest_negative(embeddings)[0] >= nearest + self.config.negative_margin).cpu()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        optional = ("negatives", "negative_margins", "wordings", "wording_edits")
        tensors = {"bank": self.bank, **{name: t for name in optional if (t := getattr(self, name)) is not None}}
        atomic_save_tensors(path, self.net.state_dict() if self.net is not None else tensors)
        dim = self.net.head.in_features if self.net is not None else self.bank.shape[1]
        atomic_write_json(path.with_suffix(".json"), {
            "epsilon": self.epsilon, "dim": dim, "config": asdict(self.config), "record": self.record})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        path = Path(path)
        meta, config, epsilon, dim = read_record(path, "router", lambda m: (
            m, RouterConfig(**m["config"]).validate(), float(m["epsilon"]), int(m["dim"])))
        tensors = load_tensors(path, "router")
        fields = router_kind(config.kind).load(path, tensors, config, dim)
        return cls(config, epsilon, record=meta.get("record", {}), **fields)


def flat_wordings(wordings: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """Per-edit wordings as one list of texts and, for each, its edit's row (what `with_wordings` takes)."""
    pairs = [(text, k) for k, texts in enumerate(wordings) for text in texts]
    return [t for t, _ in pairs], [k for _, k in pairs]


def train_router(edit_embeddings: torch.Tensor, config: RouterConfig | None = None, *,
                 calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 mirror_wordings: tuple[torch.Tensor, Sequence[int]] | None = None,
                 progress: bool = True) -> Router:
    """The router for these edit queries' embeddings.

    `calibration` = (pool queries, their paraphrases, unrelated queries) embeddings from the
    pseudo-edit pool, used to choose epsilon unless `config.epsilon` is set. `mirror_wordings`:
    other wordings the calibration mirror holds (embeddings, and each one's row: the edits first,
    then the pool queries).
    """
    config = (config or RouterConfig()).validate()
    if config.epsilon is None and calibration is None:
        raise ConfigError("router: give a calibration set from the pseudo-edit pool, or set epsilon by hand")
    router = Router.build(edit_embeddings, config, config.epsilon or 0.0, progress)
    if config.epsilon is not None:
        router.record["calibration"] = {"manual": True}
        return router
    pool_queries, pool_paraphrases, unrelated = calibration
    mirror = Router.build(torch.cat([edit_embeddings, pool_queries]), config, 0.0, progress,
                          desc="training calibration mirror")
    if mirror_wordings is not None and mirror.bank is not None and len(mirror_wordings[0]):
        mirror = mirror.with_wordings(*mirror_wordings)
    curve = epsilon_curve(mirror.distance(pool_paraphrases), mirror.distance(unrelated), config.max_distance)
    chosen = choose_epsilon(curve, config.max_false_fire, config.false_fire_weight)
    log.info("%s router: epsilon %.3f (calibration recall %.1f%%, false fire %.1f%%)",
             config.kind, chosen["epsilon"], chosen["recall"], chosen["false_fire"])
    router.epsilon = chosen["epsilon"]
    router.record["calibration"] = {"manual": False, "chosen": chosen, "curve": curve,
                                    "mirror": mirror.record["training"], "n_pool_queries": len(pool_queries),
                                    "n_unrelated": len(unrelated), "max_false_fire": config.max_false_fire}
    return router


def route_stats(router: Router, groups: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per group of query embeddings: share routed familiar (percent) and distance quantiles."""
    out = {}
    for name, emb in groups.items():
        d = router.distance(emb).cpu()
        q = torch.quantile(d, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(d) else [float("nan")] * 3
        out[name] = {"n": len(d), "familiar": 100.0 * float((d < router.epsilon).float().mean()) if len(d) else 0.0,
                     "distance_p10": q[0], "distance_median": q[1], "distance_p90": q[2]}
    return out


def _max_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q,) each normalised query's largest cosine to the normalised keys (-1 without keys), in chunks of
    about 16M cosines (one product for a few keys against every negative)."""
    if not len(keys):
        return queries.new_full((len(queries),), -1.0)
    rows = max(1024, (1 << 24) // len(keys))
    return torch.cat([(chunk @ keys.T).max(dim=1).values for chunk in queries.split(rows)])
