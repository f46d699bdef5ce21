"""The FT baseline's constrained form (FT-L): the weight box, the early stop, Adam."""

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from megedit.baselines.ft import FTConfig, fine_tune
from megedit.errors import ConfigError
from test_memit import EDITS, FMT


def _changes(model, subject):
    return [(p - subject.originals[f"model.layers.1.mlp.{n}"]).abs().max().item()
            for n, p in model.model.layers[1].mlp.named_parameters()]


def test_a_norm_constraint_keeps_every_weight_within_it_of_the_original():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    free = fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=5), progress=False)
    moved = max(_changes(model, free))
    free.restore()
    held = fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=5,
                                                       norm_constraint=1e-3), progress=False)
    assert moved > 1e-2  # unconstrained, the weights move well past the box
    assert max(_changes(model, held)) <= 1e-3 + 1e-7
    assert max(_changes(model, held)) > 5e-4  # and constrained they still move, up to its edge
    held.restore()


def test_training_stops_at_the_first_epoch_below_the_stop_loss():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    full = fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=30), progress=False)
    losses = full.settings["epoch_losses"]
    full.restore()
    assert len(losses) == 30 and losses[-1] < losses[0]
    stop = (losses[0] + losses[-1]) / 2  # reached somewhere in the middle
    early = fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=30, stop_loss=stop),
                      progress=False)
    ran = early.settings["epoch_losses"]
    early.restore()
    assert ran == losses[: len(ran)] and ran[-1] < stop and all(x >= stop for x in ran[:-1])
    assert all(not p.requires_grad for p in model.model.layers[1].mlp.parameters())  # left frozen


def test_bad_ft_settings():
    with pytest.raises(ConfigError, match="optimizer"):
        FTConfig(optimizer="lbfgs").validate()
    with pytest.raises(ConfigError, match="norm_constraint"):
        FTConfig(norm_constraint=0.0).validate()
