"""Stage A, knowledge-weight collection: fit one neuron vector per edit (METHOD.md §2.2).

The LM is frozen; for each edit only its neuron vector w is optimised so that the model
produces the target (and then the end-of-answer token) after the prompt. Edits are fitted many
at a time: each row of a batch is one edit with its own w (rows never interact), the hidden
state entering the neuron's layer is computed once per edit and reused for every step, and the
LM head runs only on the answer positions. A chat wording's opening (system turn, user header),
where the neuron stays quiet, runs once for all of them. A row leaves the batch as soon as its edit passes
the success test and the next edit takes its place, so the batch stays full. An edit whose answer an
earlier edit of its block has starts from that edit's fitted vector (warm_start): it needs fewer steps.

Success test: at every answer position (the end-of-answer token included) the target token is
the argmax, ahead of the runner-up by at least `margin` logits. Teacher-forced argmax over the
target followed by the stop token is exactly the condition for greedy decoding to produce the
target and stop; the margin keeps it true under the small numeric differences of other batch
layouts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..arch import resolve_layer
from ..data.prompts import PRESETS, PromptFormat
from ..data.requests import EditRequest
from ..errors import ConfigError, MeGError
from ..eval import evaluate
from ..lm import (after_prefix, check_prompt_lengths, context_length, model_device, prefix_cache,
                  starting_at_layer)
from ..models import model_fingerprint
from ..neuron import attach_neuron
from ..parallel import check_forkable, ranks, run_parts
from ..runtime.subject import vector_table_subject
from .fit_config import FitConfig, FitResult
from .fit_rows import cache_hidden, length_groups, row_loss_and_success, rows_batch
from .fit_shards import Shards

log = logging.getLogger(__name__)


class _RowOptimizer:
    """Adam or SGD where every row is its own problem: a row's state restarts when a new edit
    takes its slot (torch's Adam keeps one step count for the whole tensor)."""

    def __init__(self, kind: str, lr: float, rows: int, size: int, device) -> None:
        self.kind, self.base_lr = kind, lr
        self.lr = torch.full((rows, 1), lr, device=device)  # per row: a restarted edit steps at its own
        self.m = torch.zeros(rows, size, device=device)
        self.v = torch.zeros(rows, size, device=device)
        self.t = torch.zeros(rows, 1, device=device)

    def reset(self, row: int, lr: float | None = None) -> None:
        self.m[row], self.v[row], self.t[row] = 0.0, 0.0, 0.0
        self.lr[row] = self.base_lr if lr is None else lr

    @torch.no_grad()
    def step(self, w: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        if self.kind == "sgd":
            w.sub_(self.lr * grad * active)
            return
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.t += active
        self.m.mul_(torch.where(active > 0, b1, 1.0)).add_((1 - b1) * grad * active)
        self.v.mul_(torch.where(active > 0, b2, 1.0)).add_((1 - b2) * grad.square() * active)
        t = self.t.clamp(min=1)
        update = (self.m / (1 - b1**t)) / ((self.v / (1 - b2**t)).sqrt() + eps)
        w.sub_(self.lr * update * active)


def _encode(requests, variants, tokenizer, fmt, chat: PromptFormat | None):
    """Per edit and wording (its prompt, each other wording, then with `chat` its prompt as a
    one-turn chat in the format `chat`): the token sequence (prompt + answer), the answer tokens (the format's stop at
    the end: end-of-turn for the chat wording) and whether it is the chat wording."""
    seqs, answers, chats = [], [], []
    for r, v in zip(requests, variants):
        forms = [(fmt, text) for text in (r.prompt, *v)] + ([(chat, r.prompt)] if chat else [])
        answer = {f.name: f.answer_ids(r.target, tokenizer, with_stop=True) for f, _ in forms}
        seqs.append([f.prompt_ids(text, tokenizer) + answer[f.name] for f, text in forms])
        answers.append([answer[f.name] for f, _ in forms])
        chats.append([f.chat and not fmt.chat for f, _ in forms])
    return seqs, answers, chats


def chat_wording(config: FitConfig, fmt: PromptFormat, tokenizer) -> PromptFormat | None:
    """The chat format stage A adds each edit's prompt in, or None: asked for, the queries are not
    chats already, and the tokenizer has a chat template."""
    if config.chat_wording and not fmt.chat and getattr(tokenizer, "chat_template", None):
        answer_prefix = " " if config.chat_answer_space else ""
        return replace(PRESETS["chat"], system=config.chat_system, answer_prefix=answer_prefix)
    return None


def quiet_opening(config: FitConfig, fmt: PromptFormat, tokenizer) -> list[int]:
    """The chat opening the neuron stays off on while fitting (the queries' own, or the chat
    wording's), or none."""
    chat = fmt if fmt.chat else chat_wording(config, fmt, tokenizer)
    return chat.opening_ids(tokenizer) if config.quiet_chat_opening and chat is not None else []


def _one_or_all(answers: list[list[int]]) -> list[int] | list[list[int]]:
    """An edit's answer tokens for its digest: one list when every wording shares it (as digests were
    before wordings could differ in answer), else one per wording."""
    return answers[0] if all(a == answers[0] for a in answers) else answers


def fit_neurons(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat,
                config: FitConfig | None = None, progress: bool = True,
                work_dir: str | Path | None = None, part: tuple[int, int] | None = None,
                variants: Sequence[Sequence[str]] | None = None, processes: int = 1,
                starts: Mapping[str, torch.Tensor] | None = None) -> FitResult:
    """Fit one neuron vector per edit. With `work_dir`, finished edits are written there in shards
    as they finish, keyed by each edit's tokens and the settings, not by the request list: a rerun
    continues where the last one stopped, and a run on more edits fits only the new ones.

    `variants[i]`: other wordings of edit i's query (stages/variants.py), fitted with its prompt
    as extra batch rows that all share the edit's one vector: the loss is the mean over the
    wordings (those `config.wording_schedule` trains at the step), and the edit is done once
    every wording passes the success test at the same vector. An edit that reaches `max_steps`
    first counts as fitted if its prompt passes.

    `part=(k, n)` fits only the k-th of n parts of the edits (0-based; blocks of the fitting
    order, dealt in turns) into `work_dir` and returns those edits: n processes or machines sharing
    one work_dir fit the whole set, and a run without `part` then finds every edit done. A block is
    fitted from an empty batch whoever fits it, so the vectors are the same to the bit however many
    parts there are (with the same thread count per process; an interrupted block refits its rest
    beside other edits, the same to float precision).
    `processes=n` does that on this machine: n forked one-thread processes (Linux, CPU; parallel.py),
    each fitting one part, then this one collects the shards.

    `starts`: fitted vectors of earlier edits by their target (a pack's, when edits join it); with
    warm_start, an edit whose target is there and that has no leader in its block starts from it."""
    config = config or FitConfig()
    if part is not None and (work_dir is None or len(part) != 2 or not 0 <= part[0] < part[1]):
        raise ConfigError(f"part needs a work_dir and 0 <= k < n, found part={part}, work_dir={work_dir}")
    if processes != 1 and (work_dir is None or part is not None):
        raise ConfigError(f"processes needs a work_dir and no part, found work_dir={work_dir}, part={part}")
    group = ranks()[1] > 1 and part is None  # each rank of a torch.distributed group fits a part
    if group and work_dir is None:
        raise ConfigError("fit_neurons in a torch.distributed group needs a work_dir that every rank shares")
    check_forkable(model, processes)
    variants = [tuple(v) for v in variants] if variants is not None else [() for _ in requests]
    if len(variants) != len(requests):
        raise ConfigError(f"fit_neurons: {len(variants)} variant lists for {len(requests)} edits")
    config = replace(config, layer=resolve_layer(model, config.layer))
    start = time.perf_counter()
    neuron = attach_neuron(model, config.layer, config.variant, config.quiet_chat_opening)
    try:
        state = _FitState(model, tokenizer, requests, variants, fmt, config, neuron.spec, work_dir, part, starts)
        neuron.quiet_on(state.opening)
        # in a group every rank goes to the barrier, even with nothing left to fit (one left out would stop the rest)
        if group or (processes > 1 and not bool(state.done[state.mine].all())):
            run_parts(lambda k, n: _FitState(model, tokenizer, requests, variants, fmt, config, neuron.spec, work_dir,
                                             (k, n), starts).run(neuron, progress and k == 0),
                      processes, "stage A", rerun="the shards written")
            earlier = {k: state.timing[k] for k in ("reused_edits", "reused_s")}  # fitted by runs before this one
            state = _FitState(model, tokenizer, requests, variants, fmt, config, neuron.spec, work_dir, None, starts)
            state.timing["forked_edits"] = state.timing["reused_edits"] - earlier["reused_edits"]
            state.timing |= earlier
        state.run(neuron, progress)
    finally:
        neuron.detach()
    result = state.result()
    result.timing = {"total_s": time.perf_counter() - start, "processes": processes, "ranks": ranks()[1], **state.timing}
    log.info("fitted %d edits: %.1f%% success in %.0f s", len(requests), result.success_rate, result.timing["total_s"])
    return result


BLOCK_BATCHES = 4  # edits per block of the fitting order, in batches: more blocks share out better, each ends in a tail


def _part_of(block: int, parts: int) -> int:
    """The part that fits block `block`: dealt in turns that run forwards then backwards, so that no part gets
    the longest answers of every turn."""
    turn, seat = divmod(block, parts)
    return seat if turn % 2 == 0 else parts - 1 - seat


class _FitState:
    """The edits, their wordings' token sequences, and what is known of each edit (done or not)."""

    MIN_GROUP_ROWS = 32  # smaller forward passes lose more to overhead than padding costs

    def __init__(self, model, tokenizer, requests, variants, fmt, config, spec, work_dir, part=None,
                 starts=None) -> None:
        self.model, self.config, self.spec, self.part = model, config, spec, part
        # per edit, the vector an earlier fit gives its target (warm_start; used where no leader in its block is)
        self.starts = [(starts or {}).get(r.target) if config.warm_start else None for r in requests]
        self.case_ids = [r.case_id for r in requests]
        self.seqs, self.answers, chats = _encode(requests, variants, tokenizer, fmt, chat_wording(config, fmt, tokenizer))
        self.margins = [[config.chat_margin if c else config.margin for c in cs] for cs in chats]
        self.opening = quiet_opening(config, fmt, tokenizer)
        self.opening_cache = None  # the opening's keys and values in every layer (one row), once `run` starts
        self.skips = [[0] * len(seqs) for seqs in self.seqs]  # per wording: leading tokens run from that cache
        limit = min(filter(None, (config.max_prompt_tokens, context_length(model))))
        for r, seqs in zip(requests, self.seqs):
            check_prompt_lengths(seqs, limit, [f"edit {r.case_id}: wording {j} (with its answer)" for j in range(len(seqs))])
        # what an edit's fit depends on besides the settings: its tokens (a prompt alone hashes as before variants existed)
        self.digests = [hashlib.sha256(json.dumps([s[0], a[0]] if len(s) == 1 else [s, _one_or_all(a)]).encode()).digest()
                        for s, a in zip(self.seqs, self.answers)]
        self.pad_id = tokenizer.pad_token_id
        n = len(requests)
        # the edits this process fits: every block, or its part's blocks
        self.blocks = [block for b, block in enumerate(self._blocks()) if part is None or _part_of(b, part[1]) == part[0]]
        self.mine = sorted(i for block in self.blocks for i in block)
        self.vectors = torch.zeros(n, spec.size)
        self.success = torch.zeros(n, dtype=torch.bool)
        self.steps = torch.zeros(n, dtype=torch.long)
        self.loss = torch.full((n,), float("nan"))
        self.wordings_ok = torch.zeros(n)  # share of the edit's wordings (prompt included) that pass
        self.done = torch.zeros(n, dtype=torch.bool)
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.training: dict[int, list[bool]] = {}  # per wording of an edit in the batch: in its loss or not
        # row counts: wordings through the lower layers once, and the per-step forwards with and without backward
        self.timing: dict = {"reused_edits": 0, "reused_s": 0.0, "hidden_cache_s": 0.0, "cached_rows": 0,
                             "trained_rows": 0, "tested_rows": 0, "trained_tokens": 0, "tested_tokens": 0}
        self.shards = Shards(work_dir, self._key(fmt)) if work_dir else None
        if self.shards:
            self.shards.restore(self)

    def _key(self, fmt: PromptFormat) -> str:
        fit = {k: v for k, v in asdict(self.config).items() if k not in _BUILDER_FIELDS}  # the tokens say it
        blob = json.dumps({"model": model_fingerprint(self.model), "config": fit,
                           "spec": self.spec.to_dict(), "format": fmt.to_dict()})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _cache(self, edits: list[int]) -> None:
        """Hidden states entering the layer for every wording of these edits (computed in chunks
        as the queue reaches them, so memory holds only the edits in and near the batch); a
        wording that begins with the chat opening keeps the states after it."""
        start = time.perf_counter()
        flat = [(i, j) for i in edits for j in range(len(self.seqs[i]))]
        states: dict[tuple[int, int], torch.Tensor] = {}
        for skip in sorted({self.skips[i][j] for i, j in flat}):  # rows after the opening: it runs once, not per row
            part = [(i, j) for i, j in flat if self.skips[i][j] == skip]
            states |= zip(part, cache_hidden(self.model, self.config.layer, [self.seqs[i][j][skip:] for i, j in part],
                                             self.pad_id, self.config.batch_size,
                                             (self.opening_cache, skip) if skip else None))
        self.timing["cached_rows"] += len(flat)
        for i, j in flat:
            self.hidden.setdefault(i, []).append(states[i, j])
        self.timing["hidden_cache_s"] += time.perf_counter() - start

    @torch.no_grad()
    def _share_opening(self, neuron) -> None:
        """Run the chat opening once: the neuron is quiet there, so its keys and values in every layer are
        the base model's, whatever the vectors. Wordings that begin with it then run only the rest."""
        if not self.opening or self.opening_cache is not None:
            return
        with neuron.applied(None):
            cache = prefix_cache(self.model, self.opening)
        if cache is None:  # sliding-window layers: every row runs whole, the hook keeps the neuron quiet
            return
        self.opening_cache = cache
        n = len(self.opening)
        self.skips = [[n if len(seq) > n and seq[:n] == self.opening else 0 for seq in seqs] for seqs in self.seqs]

    def _blocks(self) -> list[list[int]]:
        """Every edit in fitting order, cut into blocks of BLOCK_BATCHES batches. The order: similar answer
        lengths side by side (the LM head runs on the longest answer's span), then equal answers side by side
        (so that a warm-started edit finds its leader in its own block), then prompt lengths; the digest breaks
        ties. Within a block, with warm_start, the first edit of each answer comes first: the others wait for
        it. A block is fitted on its own from an empty batch: an edit's fit is the same float for float
        whichever process fits its block."""
        order = sorted(range(len(self.seqs)), key=lambda i: (len(self.answers[i][0]), self.answers[i][0],
                                                             len(self.seqs[i][0]), self.digests[i], i))
        size = BLOCK_BATCHES * self.config.batch_size
        blocks = [order[k : k + size] for k in range(0, len(order), size)]
        return [sorted(block, key=lambda i, followers=self._leaders(block): i in followers) for block in blocks]

    def run(self, neuron, progress: bool) -> None:
        todo = [[i for i in block if not self.done[i]] for block in self.blocks]
        if not any(todo):
            return
        self._share_opening(neuron)
        bar = tqdm(total=sum(map(len, todo)), desc="fitting neurons", disable=not progress, leave=False)
        step_s = time.perf_counter()
        for block, queue in zip(self.blocks, todo):
            if queue:
                self._fit_block(neuron, queue, self._leaders(block), bar)
        bar.close()
        self.timing["fit_s"] = time.perf_counter() - step_s - self.timing["hidden_cache_s"]

    def _leaders(self, block: list[int]) -> dict[int, int]:
        """{edit: the first edit of `block` with the same answer tokens} for every later one (warm_start), from
        the whole block, fitted or not: a block resumed after a kill warm-starts its edits as before."""
        if not self.config.warm_start:
            return {}
        first: dict[tuple, int] = {}
        leaders = {}
        for i in block:
            lead = first.setdefault(tuple(self.answers[i][0]), i)
            if lead != i:
                leaders[i] = lead
        return leaders

    def _next_edit(self, queue: list[int], leaders: dict[int, int]) -> int | None:
        """The first edit of `queue` that can start now: one whose leader, if it has one, is fitted."""
        k = next((k for k, i in enumerate(queue) if i not in leaders or self.done[leaders[i]]), None)
        return None if k is None else queue.pop(k)

    def _fit_block(self, neuron, queue: list[int], leaders: dict[int, int], bar) -> None:
        """Fit the edits `queue` (in order), a batch of them at a time, refilling each slot that finishes; an edit
        with a leader waits for it and starts from its vector (from the initial one if the leader failed)."""
        device = model_device(self.model)
        chunk = 4 * self.config.batch_size
        initial = self.spec.initial_vector(self.config.init_seed).to(device)
        rows = min(self.config.batch_size, len(queue))
        w = initial.repeat(rows, 1)
        opt = _RowOptimizer(self.config.optimizer, self.config.lr, rows, self.spec.size, device)
        slots: list[int | None] = [None] * rows
        taken = torch.zeros(rows, dtype=torch.long)
        while True:
            for r in range(rows):  # refill free slots
                if slots[r] is None and queue:
                    i = self._next_edit(queue, leaders)
                    if i is None:
                        break
                    if i not in self.hidden:
                        self._cache([i, *(j for j in queue[: chunk - 1] if j not in self.hidden)])
                    slots[r], taken[r] = i, 0
                    others = len(self.seqs[i]) - 1  # the prompt always trains; the others per the schedule
                    self.training[i] = [True] + [self.config.wording_schedule == "all"] * others
                    start = self._warm_start(i, leaders)
                    w[r] = initial if start is None else start.to(device)
                    opt.reset(r, None if start is None else self.config.warm_lr)
            live = [r for r in range(rows) if slots[r] is not None]
            if not live:
                break
            self._restart_stalled(live, w, opt, taken, initial)
            finished = self._step(neuron, w, opt, live, slots, taken, device)
            for r in finished:
                self.hidden.pop(slots[r], None)
                self.training.pop(slots[r], None)
                slots[r] = None
            bar.update(len(finished))
            if finished and self.shards:
                self.shards.flush(self)

    def _warm_start(self, i: int, leaders: dict[int, int]) -> torch.Tensor | None:
        """Edit i's warm start: its block leader's fitted vector (none if the leader failed), else an earlier
        fit's for its target (`starts`); None: the initial vector."""
        lead = leaders.get(i)
        if lead is not None:
            return self.vectors[lead] if bool(self.success[lead]) else None
        return self.starts[i]

    def _restart_stalled(self, live, w, opt, taken, initial) -> None:
        """An edit still unfitted after `restart_steps` starts again from the initial vector at the
        lower `restart_lr` (its steps go on counting towards max_steps)."""
        if self.config.restart_steps is None:
            return
        for r in live:
            if int(taken[r]) == self.config.restart_steps:
                w[r] = initial
                opt.reset(r, self.config.restart_lr)

    def _step(self, neuron, w, opt, live, slots, taken, device) -> list[int]:
        edits = [slots[r] for r in live]
        count = torch.tensor([float(len(self.seqs[i])) for i in edits], device=device)
        edit_w = w[live].clone().requires_grad_(True)
        trained = [(k, j) for k, i in enumerate(edits) for j, on in enumerate(self.training[i]) if on]
        outcome = self._rows_outcome(neuron, edits, trained, edit_w, count, device, train=True)
        # an edit whose trained wordings all pass may be done: its other wordings are checked at the same vector
        failing = {k for (k, _), (_, ok) in outcome.items() if not ok}
        capped = {k for k, r in enumerate(live) if taken[r] >= self.config.max_steps}
        candidates = [k for k in range(len(edits)) if k not in failing or k in capped]
        checks = [(k, j) for k in candidates for j in range(len(self.seqs[edits[k]])) if (k, j) not in outcome]
        tested = self._rows_outcome(neuron, edits, checks, edit_w.detach(), count, device, train=False)
        for (k, j), (_, ok) in tested.items():
            self.training[edits[k]][j] |= not ok
        outcome.update(tested)
        finished = []
        for k in candidates:
            i, r = edits[k], live[k]
            losses, oks = zip(*(outcome[k, j] for j in range(len(self.seqs[i]))))
            if all(oks) or k in capped:
                self.vectors[i], self.success[i] = edit_w[k].detach().cpu(), oks[0]
                self.steps[i], self.loss[i], self.done[i] = int(taken[r]), sum(losses) / len(losses), True
                self.wordings_ok[i] = sum(oks) / len(oks)
                self.shards and self.shards.pending.append(i)
                finished.append(r)
        active = torch.zeros(w.shape[0], 1, device=device)
        grad = torch.zeros_like(w)
        idx = torch.tensor(live, device=device)
        if edit_w.grad is not None:
            grad[idx] = edit_w.grad
        active[idx] = 1.0
        active[torch.tensor(finished, dtype=torch.long, device=device)] = 0.0
        opt.step(w, grad, active)
        taken[[r for r in live if r not in finished]] += 1
        return finished

    def _rows_outcome(self, neuron, edits, pairs, edit_w, count, device, train: bool) -> dict:
        """{(k, j): (loss, passed)} for wording j of edit slot k, each pair in `pairs`, with the
        vectors `edit_w`; with `train` the gradient of each edit's loss (the mean over all its
        wordings, these pairs' terms) is added to edit_w.grad."""
        if not pairs:
            return {}
        self.timing["trained_rows" if train else "tested_rows"] += len(pairs)
        rows = [(self.seqs[edits[k]][j][self.skips[edits[k]][j]:], self.hidden[edits[k]][j], self.answers[edits[k]][j],
                 self.margins[edits[k]][j], self.skips[edits[k]][j]) for k, j in pairs]
        owner = torch.tensor([k for k, _ in pairs], device=device)
        row_loss = torch.zeros(len(rows), device=device)
        row_ok = torch.zeros(len(rows), dtype=torch.bool, device=device)
        # rows of similar length together (wordings differ in length; padding them to the longest costs
        # about 40% of the compute), one forward (and backward) each, the gradients adding up in edit_w;
        # rows after the chat opening apart from whole rows
        with torch.set_grad_enabled(train):
            for skip in sorted({row[4] for row in rows}):
                kin = [k for k, row in enumerate(rows) if row[4] == skip]
                for group in length_groups([len(rows[k][0]) for k in kin], self.MIN_GROUP_ROWS):
                    group = [kin[g] for g in group]
                    idx = torch.tensor(group, device=device)
                    loss, ok = self._rows_forward(neuron, [rows[j] for j in group], edit_w[owner[idx]], device)
                    if train:
                        (loss / count[owner[idx]]).sum().backward()
                    row_loss[idx], row_ok[idx] = loss.detach(), ok
        self.timing["trained_tokens" if train else "tested_tokens"] += sum(len(row[0]) for row in rows)
        # read the outcomes once (not one device sync per row)
        return dict(zip(pairs, zip(row_loss.tolist(), row_ok.tolist())))

    def _rows_forward(self, neuron, rows, row_w, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row answer loss and success test of `rows` with vectors `row_w`."""
        batch, h, labels = rows_batch([row[:3] for row in rows], self.pad_id, device)
        margins = torch.tensor([row[3] for row in rows], device=device)
        skip = rows[0][4]  # rows after the shared chat opening: its cache, its columns in the mask, positions after it
        inputs = after_prefix(self.model, batch, self.opening_cache, skip) if skip else \
            batch.model_inputs | {"use_cache": False}
        neuron.set_weights(row_w)
        with starting_at_layer(self.model, self.config.layer, h):
            # the LM head (49K x 576 on SmolLM2) costs as much as the layers: run it only where an answer is predicted
            keep = torch.arange(batch.ids.shape[1] - labels.shape[1] - 1, batch.ids.shape[1] - 1, device=device)
            logits = self.model(**inputs, logits_to_keep=keep).logits
        return row_loss_and_success(logits, labels, margins)

    def result(self) -> FitResult:
        mine = torch.tensor(self.mine, dtype=torch.long)
        if not bool(self.done[mine].all()):
            raise MeGError("neuron fitting stopped before every edit was done")
        wordings = torch.tensor([len(self.seqs[i]) for i in self.mine])
        return FitResult([self.case_ids[i] for i in self.mine], self.vectors[mine], self.success[mine],
                         self.steps[mine], self.loss[mine], self.spec, self.config,
                         wordings=wordings, wordings_ok=self.wordings_ok[mine])


# FitConfig fields that only say how MeGEditor builds the wordings: a fit depends on the wordings' tokens
_BUILDER_FIELDS = ("paraphrases", "prefixes", "lone_prefixes", "prefix_pool", "prefix_tokens",
                   "exclude_eval_templates", "max_prompt_tokens", "chat_wording",
                   "chat_answer_space")  # max_prompt_tokens only refuses


def fitted_subject(model, tokenizer, result: FitResult):
    """The model with each edit's fitted vector applied to every query of that edit (its prompt,
    rephrase and locality query): the upper bound a generator can reach with a perfect router,
    and, on locality queries, the damage a static neuron would do without one."""
    settings = {"method": "fitted-vectors", "spec": result.spec.to_dict(), "fit": result.summary()}
    return vector_table_subject(model, tokenizer, result.spec, dict(zip(result.case_ids, result.vectors)),
                                lambda q: q.case_id, "fitted", settings)


def sweep_layers(model, tokenizer, requests: Sequence[EditRequest], fmt: PromptFormat, layers: Sequence[int],
                 config: FitConfig | None = None, progress: bool = True) -> list[dict]:
    """Fit the same edits at each layer; per layer: success, steps, time, and the fitted vectors'
    Reliability / Generality / Locality through the evaluation harness."""
    rows = []
    for layer in tqdm(layers, desc="sweeping layers", disable=not progress):
        cfg = FitConfig(**{**asdict(config or FitConfig()), "layer": layer})
        result = fit_neurons(model, tokenizer, requests, fmt, cfg, progress=progress)
        subject = fitted_subject(model, tokenizer, result)
        try:
            report = evaluate(subject, requests, prompt_format=fmt, progress=progress)
        finally:
            subject.neuron.detach()
        summary = result.summary()
        rows.append({"layer": layer, "success_rate": summary["success_rate"], "median_steps": summary["median_steps"],
                     "mean_steps": summary["mean_steps"], "fit_s": result.timing["total_s"],
                     "metrics": report.metrics, "score": report.score})
        log.info("layer %d: success %.1f%%, Gen AG %.1f", layer, summary["success_rate"],
                 report.metrics["generality"]["ag"])
    return rows
