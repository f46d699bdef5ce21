"""The model fingerprint is hashed once per weight state, never stale after a weight edit; the long
loops show a progress bar when asked to and print nothing otherwise."""

import copy

import pytest
import torch
from tiny import char_tokenizer, tiny_encoder, tiny_model

import megedit.models as models
from megedit.baselines.ft import FTConfig, fine_tune
from megedit.baselines.memit import MemitConfig, batch_edit
from megedit.models import model_fingerprint
from megedit.stages.encoder import _CachedInputs
from megedit.stages.variants import context_prefixes

from test_memit import EDITS, FMT, TEXTS, _own_cache  # noqa: F401  (the same edits; its autouse cache fixture)


@pytest.fixture
def hashes(monkeypatch):
    """The models whose weights were hashed in full, one entry per hash."""
    calls, real = [], models._hash_weights

    def counted(model, tensors, progress):
        calls.append(model)
        return real(model, tensors, progress)

    monkeypatch.setattr(models, "_hash_weights", counted)
    return calls


def test_the_fingerprint_is_hashed_once_per_weight_state(hashes):
    model = tiny_model("llama")
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first and len(hashes) == 1  # the second call does not rehash
    assert model_fingerprint(copy.deepcopy(model)) == first and len(hashes) == 2  # same weights, other object
    weight = model.model.layers[0].mlp.up_proj.weight
    original, copied = weight.data, weight.data.clone()
    weight.data = copied  # a .data swap to equal values: hashed again, same digest
    assert model_fingerprint(model) == first and len(hashes) == 3
    weight.data = original  # swapping back and forth (as `unedited()` does) finds both states known
    assert model_fingerprint(model) == first and len(hashes) == 3
    with torch.no_grad():
        weight[3, 5] += 1e-3  # one element, in place
    changed = model_fingerprint(model)
    assert changed != first and len(hashes) == 4
    assert changed == model_fingerprint(copy.deepcopy(model))  # the digest of the weights as they are now
    weight.data = copied  # the weight's version counter moved on: hashed again, to the right digest
    assert model_fingerprint(model) == first and len(hashes) == 6


def test_a_write_through_a_data_alias_is_caught_by_the_sampled_checksum(hashes):
    model = tiny_model("llama")
    first = model_fingerprint(model)
    weight = model.model.layers[1].self_attn.q_proj.weight
    version = weight._version
    weight.data.mul_(1.5)  # .data does not share the version counter
    assert weight._version == version
    assert model_fingerprint(model) != first and len(hashes) == 2


def test_weight_editing_baselines_never_get_a_stale_fingerprint(hashes):
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    base = model_fingerprint(model)
    subject = batch_edit(model, tok, EDITS, FMT, TEXTS, MemitConfig(layers=(1,), v_steps=3), progress=False)
    edited = model_fingerprint(model)
    assert edited != base and edited == models._hash_weights(model, models._base_tensors(model), False)
    n = len(hashes)
    with subject.unedited():
        assert model_fingerprint(model) == base and len(hashes) == n + 1  # the originals are other tensors
    assert model_fingerprint(model) == edited
    with subject.unedited():
        assert model_fingerprint(model) == base
    assert len(hashes) == n + 1  # both states are known now
    subject.restore()
    assert model_fingerprint(model) == base
    ft = fine_tune(model, tok, EDITS, FMT, FTConfig(epochs=1), progress=False)
    tuned = model_fingerprint(model)
    assert tuned not in (base, edited)
    ft.restore()
    assert model_fingerprint(model) == base


def test_bars_show_only_when_asked(capsys, monkeypatch):
    monkeypatch.setattr(models, "_BAR_BYTES", 0)  # the tiny model hashes fast; show its bar all the same
    model, tok, encoder = tiny_model("llama"), char_tokenizer(), tiny_encoder(layers=2)
    texts = [f"text number {i}" for i in range(5)]
    model_fingerprint(model)
    encoder.encode(texts, batch_size=2)
    context_prefixes(model, tok, 2, tokens=2)
    _CachedInputs(encoder, texts, 1, batch_size=2)
    assert capsys.readouterr().err == ""
    model_fingerprint(copy.deepcopy(model), progress=True)
    encoder.encode(texts, batch_size=2, progress=True)
    context_prefixes(model, tok, 2, tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "fingerprinting model" in err and "encoding sentences" in err and "context prefixes" in err
    _CachedInputs(encoder, texts, 1, batch_size=2, progress=True)
    assert "encoding sentences" in capsys.readouterr().err
    encoder.encode(texts[:2], batch_size=2, progress=True)  # one batch: no bar
    assert capsys.readouterr().err == ""


def test_memit_and_ft_show_their_per_layer_and_per_batch_bars_when_asked(capsys):
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    config = MemitConfig(layers=(0, 1), v_steps=3)
    batch_edit(model, tok, EDITS, FMT, TEXTS, config, progress=False).restore()
    fine_tune(model, tok, EDITS, FMT, FTConfig(epochs=1, batch_size=1), progress=False).restore()
    assert capsys.readouterr().err == ""
    batch_edit(model, tok, EDITS, FMT, TEXTS[:20], config, progress=True).restore()  # new texts: not cached
    err = capsys.readouterr().err
    assert "memit layers" in err and "key covariance" in err
    fine_tune(model, tok, EDITS, FMT, FTConfig(epochs=1, batch_size=1), progress=True).restore()
    assert "FT layer inputs" in capsys.readouterr().err
