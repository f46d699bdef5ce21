"""Stage C: the familiarity router, which lets the neuron fire only for queries near an edit.

A small residual MLP learns to give every edit query a RANDOM label out of K. It can only do that
by memorising the edit queries, so near one of them (a paraphrase) its prediction is confident
(low entropy) and elsewhere it is not. `H < epsilon` means familiar: generate the neuron.

Epsilon is calibrated without the test queries: a mirror router is trained on the edit prompts
plus a held-out slice of the pseudo-edit pool; the entropy of that slice's paraphrases (which
the mirror never saw) stands for the edits' paraphrases, and the entropy of the slice's
unrelated (locality) queries for unrelated traffic. The threshold that best separates the two
(or the most recall under a false-fire cap) is used for the real router, trained on the edits alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, MeGError
from ..io import atomic_save_tensors, atomic_write_json, load_tensors

log = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    classes: int = 10  # K, far below the number of edits
    blocks: int = 5
    expansion: int = 4
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 1000
    fit_entropy: float = 0.01  # stop once the edit queries' mean entropy is below this
    seed: int = 0
    epsilon: float | None = None  # None: calibrate on the pseudo-edit pool
    max_false_fire: float | None = None  # calibration: most recall with false fire <= this (percent); None: best recall - false fire

    def validate(self) -> "RouterConfig":
        if self.classes < 2 or self.blocks < 0 or self.expansion < 1 or self.max_epochs < 1:
            raise ConfigError(f"router config: need classes >= 2, blocks >= 0, expansion >= 1, max_epochs >= 1, "
                              f"got {asdict(self)}")
        if self.epsilon is not None and not 0 < self.epsilon <= math.log(self.classes):
            raise ConfigError(f"router config: epsilon must be in (0, ln K = {math.log(self.classes):.3f}], "
                              f"got {self.epsilon}")
        return self


class FamiliarityNet(nn.Module):
    """`blocks` residual blocks x + Dropout(Linear(GELU(Linear(x)))), then a K-way head."""

    def __init__(self, dim: int, config: RouterConfig) -> None:
        super().__init__()
        width = config.expansion * dim
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim), nn.Dropout(config.dropout))
            for _ in range(config.blocks)
        )
        self.head = nn.Linear(dim, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dim) -> (B, K) logits
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    @torch.no_grad()
    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """Natural-log entropy of the predicted label distribution, (B,); at most ln K."""
        was_training = self.training
        self.eval()
        log_p = torch.log_softmax(self(x), dim=-1)
        self.train(was_training)
        return -(log_p.exp() * log_p).sum(-1)


def train_familiarity_net(embeddings: torch.Tensor, config: RouterConfig, progress: bool = True,
                          desc: str = "training router") -> tuple[FamiliarityNet, dict]:
    """Memorise a random label per row of `embeddings` (seeded); returns the net and a record
    (epochs run, final train accuracy and mean entropy, seconds)."""
    config.validate()
    start = time.perf_counter()
    cuda = [embeddings.device.index or 0] if embeddings.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeds init and dropout without touching the caller's RNG
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        labels = torch.randint(config.classes, (len(embeddings),), generator=gen).to(embeddings.device)
        net = FamiliarityNet(embeddings.shape[1], config).to(embeddings.device)
        epoch, mean_h = _memorise(net, embeddings.detach(), labels, config, gen, progress, desc)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = 100.0 * float((net(embeddings).argmax(-1) == labels).float().mean())
    record = {"epochs": epoch, "train_accuracy": accuracy, "train_mean_entropy": mean_h,
              "seconds": time.perf_counter() - start}
    log.info("router: %d epochs, accuracy %.1f%%, mean entropy %.4f", epoch, accuracy, mean_h)
    return net, record


def _memorise(net: FamiliarityNet, x: torch.Tensor, labels: torch.Tensor, config: RouterConfig,
              gen: torch.Generator, progress: bool, desc: str) -> tuple[int, float]:
    """AdamW on cross-entropy until the mean entropy on `x` is below `config.fit_entropy`
    (checked every 10 epochs); returns (epochs run, last mean entropy)."""
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    epoch, mean_h = 0, float("nan")
    bar = tqdm(total=config.max_epochs, desc=desc, disable=not progress)
    for epoch in range(1, config.max_epochs + 1):
        net.train()
        for rows in torch.randperm(len(x), generator=gen).split(config.batch_size):
            loss = nn.functional.cross_entropy(net(x[rows]), labels[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        bar.update()
        if epoch % 10 == 0 or epoch == config.max_epochs:
            mean_h = float(net.entropy(x).mean())
            bar.set_postfix(entropy=f"{mean_h:.4f}")
            if mean_h < config.fit_entropy:
                break
    bar.close()
    return epoch, mean_h


def epsilon_curve(familiar: torch.Tensor, unrelated: torch.Tensor, classes: int, points: int = 200) -> list[dict]:
    """Recall (familiar entropies below epsilon) and false fire (unrelated ones below it), in
    percent, over a grid of epsilon from 0 to ln K."""
    rows = []
    for eps in torch.linspace(0, math.log(classes), points + 1)[1:].tolist():
        rows.append({"epsilon": eps, "recall": 100.0 * float((familiar < eps).float().mean()),
                     "false_fire": 100.0 * float((unrelated < eps).float().mean())})
    return rows


def choose_epsilon(curve: list[dict], max_false_fire: float | None = None) -> dict:
    """The curve row to use: the best recall - false fire, or (with a cap) the most recall whose
    false fire stays within the cap; ties go to the smaller epsilon (the safer side)."""
    allowed = [r for r in curve if max_false_fire is None or r["false_fire"] <= max_false_fire]
    if not allowed:
        return curve[0]
    key = (lambda r: r["recall"]) if max_false_fire is not None else (lambda r: r["recall"] - r["false_fire"])
    best = max(key(r) for r in allowed)
    return next(r for r in allowed if key(r) == best)


@dataclass
class Router:
    """The trained net, its threshold, and how the threshold was chosen."""

    net: FamiliarityNet
    epsilon: float
    config: RouterConfig
    record: dict = field(default_factory=dict)  # training record and the calibration (curve, choice)

    def entropy(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net.entropy(embeddings.to(next(self.net.parameters()).device))

    def familiar(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Bool (B,): which queries should get a generated neuron."""
        return self.entropy(embeddings) < self.epsilon

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_save_tensors(path, self.net.state_dict())
        atomic_write_json(path.with_suffix(".json"), {
            "epsilon": self.epsilon, "dim": self.net.head.in_features, "config": asdict(self.config),
            "record": self.record})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError) as error:
            raise MeGError(f"{path.with_suffix('.json')}: not a readable router record ({error})") from None
        config = RouterConfig(**meta["config"])
        net = FamiliarityNet(meta["dim"], config)
        net.load_state_dict(load_tensors(path, "router"))
        return cls(net.eval().requires_grad_(False), float(meta["epsilon"]), config, meta.get("record", {}))


def train_router(edit_embeddings: torch.Tensor, config: RouterConfig | None = None, *,
                 calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 progress: bool = True) -> Router:
    """The router for these edit queries' embeddings.

    `calibration` = (pool queries, their paraphrases, unrelated queries) embeddings from the
    pseudo-edit pool, used to choose epsilon unless `config.epsilon` is set.
    """
    config = (config or RouterConfig()).validate()
    net, record = train_familiarity_net(edit_embeddings, config, progress)
    if config.epsilon is not None:
        return Router(net, config.epsilon, config, {"training": record, "calibration": {"manual": True}})
    if calibration is None:
        raise ConfigError("router: give a calibration set from the pseudo-edit pool, or set epsilon by hand")
    pool_queries, pool_paraphrases, unrelated = calibration
    mirror, mirror_record = train_familiarity_net(torch.cat([edit_embeddings, pool_queries]), config, progress,
                                                  desc="training calibration mirror")
    curve = epsilon_curve(mirror.entropy(pool_paraphrases), mirror.entropy(unrelated), config.classes)
    chosen = choose_epsilon(curve, config.max_false_fire)
    log.info("router: epsilon %.3f (calibration recall %.1f%%, false fire %.1f%%)",
             chosen["epsilon"], chosen["recall"], chosen["false_fire"])
    calibration_record = {"manual": False, "chosen": chosen, "curve": curve, "mirror": mirror_record,
                          "n_pool_queries": len(pool_queries), "n_unrelated": len(unrelated),
                          "max_false_fire": config.max_false_fire}
    return Router(net, chosen["epsilon"], config, {"training": record, "calibration": calibration_record})


def route_stats(router: Router, groups: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per group of query embeddings: share routed familiar (percent) and entropy quantiles."""
    out = {}
    for name, emb in groups.items():
        h = router.entropy(emb).cpu()
        q = torch.quantile(h, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(h) else [float("nan")] * 3
        out[name] = {"n": len(h), "familiar": 100.0 * float((h < router.epsilon).float().mean()) if len(h) else 0.0,
                     "entropy_p10": q[0], "entropy_median": q[1], "entropy_p90": q[2]}
    return out

