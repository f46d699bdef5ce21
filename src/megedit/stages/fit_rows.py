"""Stage A's rows: one wording of one edit, its cached hidden state and answer tokens, batched for
the layers above the neuron; similar lengths grouped together; the answer loss and success test."""

from __future__ import annotations

from typing import Sequence

import torch

from ..lm import Batch, after_prefix, layer_input, left_pad, length_batches, model_device


@torch.no_grad()
def cache_hidden(model, layer, seqs, pad_id, batch_size, opening: tuple | None = None) -> list[torch.Tensor]:
    """The hidden state entering `layer` for each sequence (its real tokens only). `opening`: (its cache,
    its length) when the sequences go on after a shared opening (their tokens after it given): it is not
    run again."""
    hidden: list = [None] * len(seqs)
    for idx in length_batches([len(s) for s in seqs], batch_size):
        batch = left_pad([seqs[i] for i in idx], pad_id, model_device(model))
        h = layer_input(model, layer, batch if opening is None else after_prefix(model, batch, *opening))
        for row, i in enumerate(idx):
            hidden[i] = h[row, h.shape[1] - len(seqs[i]) :].clone()
    return hidden


def rows_batch(rows, pad_id, device) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Left-padded batch of `rows` ((token sequence, cached hidden state, answer tokens) each), the hidden
    states, and labels for the `span` positions before the last (the positions that predict an
    answer token; -100 where a row's shorter answer leaves one free)."""
    batch = left_pad([seq for seq, _, _ in rows], pad_id, device)
    width = batch.ids.shape[1]
    h = rows[0][1].new_zeros(len(rows), width, rows[0][1].shape[-1])
    span = max(len(answer) for _, _, answer in rows)
    labels = torch.full((len(rows), span), -100, dtype=torch.long, device=device)
    for row, (seq, hidden, answer) in enumerate(rows):
        h[row, width - len(seq) :] = hidden
        labels[row, span - len(answer) :] = torch.as_tensor(answer, device=device)
    return batch, h, labels


def length_groups(lengths: Sequence[int], min_rows: int) -> list[list[int]]:
    """Indices sorted by length and cut into groups of at least `min_rows` (the last may hold
    fewer), each group ending where the length changes: little padding, few forward passes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = [[]]
    for k, i in enumerate(order):
        if len(groups[-1]) >= min_rows and lengths[i] != lengths[order[k - 1]]:
            groups.append([])
        groups[-1].append(i)
    if len(groups) > 1 and len(groups[-1]) < min_rows:  # a short tail joins the group before
        groups[-2].extend(groups.pop())
    return groups


def row_loss_and_success(logits, labels, margin) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean answer cross-entropy, and whether every answer token wins by `margin` (a number,
    or one per row)."""
    margin = torch.as_tensor(margin, device=logits.device, dtype=torch.float32).reshape(-1, 1)
    mask = labels >= 0
    safe = labels.clamp(min=0)
    logits = logits.float()
    # over (positions, vocabulary) rows: the vocabulary contiguous (a transposed view runs the softmax 2x slower)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), safe.flatten(), reduction="none").view_as(safe)
    loss = (ce * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        target = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        top = logits.topk(2, dim=-1)  # the runner-up: the best other token
        rival = torch.where(top.indices[..., 0] == safe, top.values[..., 1], top.values[..., 0])
        ok = ((target - rival >= margin) | ~mask).all(1)
    return loss, ok
