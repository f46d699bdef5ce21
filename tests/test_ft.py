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


class _Killed(Exception):
    pass


def _killed_after(monkeypatch, epochs: int) -> list:
    """Make training raise after `epochs` more epochs, as a killed run would stop; the calls made."""
    from megedit.baselines import ft

    real = getattr(ft._Training.epoch, "real", ft._Training.epoch)  # not an earlier patch of this test's
    calls = []

    def epoch(self, *args):
        if len(calls) == epochs:
            raise _Killed
        calls.append(1)
        return real(self, *args)

    epoch.real = real
    monkeypatch.setattr(ft._Training, "epoch", epoch)
    return calls


def _mlp(model):
    return [p.detach().clone() for p in model.model.layers[1].mlp.parameters()]


def test_a_killed_training_resumes_from_its_last_epoch_and_a_finished_one_is_reloaded(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    config = FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=6)
    base = _mlp(model)
    whole = fine_tune(model, tok, EDITS, FMT, config, progress=False)
    trained, losses = _mlp(model), whole.settings["epoch_losses"]
    whole.restore()

    state = tmp_path / "ft.pt"
    _killed_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        fine_tune(model, tok, EDITS, FMT, config, progress=False, checkpoint=state)
    # a killed process loses its half-trained weights; the next one starts from the base model
    for p, original in zip(model.model.layers[1].mlp.parameters(), base):
        p.data = original.clone()

    calls = _killed_after(monkeypatch, 99)
    resumed = fine_tune(model, tok, EDITS, FMT, config, progress=False, checkpoint=state)
    assert len(calls) == 4  # epochs 3-6 only
    assert resumed.settings["epoch_losses"] == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_mlp(model), trained))
    resumed.restore()

    calls = _killed_after(monkeypatch, 0)  # finished: loaded, not one more epoch
    reloaded = fine_tune(model, tok, EDITS, FMT, config, progress=False, checkpoint=state)
    assert not calls and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_mlp(model), trained))
    assert reloaded.describe() == resumed.describe()  # so a killed evaluation of it resumes too
    reloaded.restore()


def test_a_checkpoint_of_another_training_is_ignored_and_an_unreadable_one_named(tmp_path, caplog):
    from megedit.errors import MeGError

    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    state = tmp_path / "ft.pt"
    fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.05, optimizer="adam", epochs=2),
              progress=False, checkpoint=state).restore()
    other = fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, lr=0.01, optimizer="adam", epochs=2),
                      progress=False, checkpoint=state)
    assert "FT checkpoint of another run" in caplog.text and len(other.settings["epoch_losses"]) == 2
    other.restore()
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(MeGError, match="ft.pt: not a readable FT checkpoint"):
        fine_tune(model, tok, EDITS, FMT, FTConfig(layer=1, epochs=2), progress=False, checkpoint=state)
