"""The "entropy" router kind, the paper's: a small residual MLP learns a RANDOM label out of K for
every edit prompt. It can only do that by memorising them, so near one of them (a paraphrase) it
is confident; a query's distance is the entropy of its prediction (0 .. ln K)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MeGError

log = logging.getLogger(__name__)


class NetSettings(Protocol):
    """What the net reads of a RouterConfig (router.py; not imported, which would close a circle)."""

    classes: int
    blocks: int
    expansion: int
    dropout: float
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    fit_entropy: float
    seed: int

    def validate(self) -> "NetSettings": ...


class EntropyKind:
    """The "entropy" router: a net memorises a random label per edit prompt; distance = its entropy.
    `build` and `load` give the Router's fields (router.py makes the Router)."""

    holds_wordings = False  # the net knows its edit prompts only
    trains = True  # a net trained for up to max_epochs

    def max_distance(self, config: NetSettings) -> float:
        return math.log(config.classes)

    def distance_label(self, config: NetSettings) -> str:
        return f"router entropy (nats; max ln {config.classes})"

    def build(self, edit_embeddings: torch.Tensor, config: NetSettings, progress: bool, desc: str) -> dict:
        net, record = train_familiarity_net(edit_embeddings, config, progress, desc)
        return {"net": net, "record": {"training": record}}

    def load(self, path: Path, tensors: dict, config: NetSettings, dim: int) -> dict:
        net = FamiliarityNet(dim, config)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as error:
            raise MeGError(f"{path}: router weights do not match its record ({str(error).splitlines()[0]})") from None
        return {"net": net.eval().requires_grad_(False)}


class FamiliarityNet(nn.Module):
    """`blocks` residual blocks x + Dropout(Linear(GELU(Linear(x)))), then a K-way head."""

    def __init__(self, dim: int, config: NetSettings) -> None:
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


def train_familiarity_net(embeddings: torch.Tensor, config: NetSettings, progress: bool = True,
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


def _memorise(net: FamiliarityNet, x: torch.Tensor, labels: torch.Tensor, config: NetSettings,
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
