"""MEMIT and AlphaEdit: the closed-form updates, and a batch edit of a tiny model."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from megedit.baselines.memit import (MemitConfig, alphaedit_update, batch_edit, keys_and_hidden, memit_update,
                                     null_space_projector, search_values, subject_positions, target_values)
from megedit.data import EditRequest
from megedit.data.prompts import PromptFormat
from megedit.errors import ConfigError

FMT = PromptFormat("raw")
EDITS = [EditRequest(f"e{i}", f"{s} lives in", t, subject=s)
         for i, (s, t) in enumerate([("Ann", "Rome"), ("Bob", "Oslo"), ("Cy", "Lima")])]
TEXTS = [f"some ordinary text number {i} about things." for i in range(40)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Key covariances and target values are cached; keep them out of the user's cache."""
    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path / "cache"))


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_memit_update_solves_its_normal_equations_and_maps_keys_to_values_when_lambda_is_small():
    keys, resid, c = _random(5, 12), _random(5, 7, seed=1), _random(40, 12, seed=2)
    cov = c.T @ c / 40
    update = memit_update(keys, resid, cov, 3.0)
    assert torch.allclose(update @ (3.0 * cov + keys.T @ keys), resid.T @ keys, atol=1e-10)
    exact = memit_update(keys, resid, cov, 1e-9)  # n < d_k: every key can hit its value exactly
    assert torch.allclose(keys @ exact.T, resid, atol=1e-6)


def test_alphaedit_update_is_orthogonal_to_the_preserved_keys():
    preserved = _random(8, 12, seed=3)  # rank 8 of 12: a 4-dimensional null space
    cov = preserved.T @ preserved / 8
    projector = null_space_projector(cov, 1e-8)
    assert round(float(projector.trace())) == 4
    keys, resid = _random(3, 12, seed=4), _random(3, 6, seed=5)
    update = alphaedit_update(keys, resid, projector, 1.0)
    assert (update @ preserved.T).abs().max() < 1e-10 * update.abs().max()
    assert update.abs().max() > 1e-3  # it does change something


def test_subject_last_token_positions():
    tok = char_tokenizer()
    assert subject_positions(tok, FMT, EDITS) == [2, 2, 1]  # "Ann" ends at character 2; "Cy" at 1
    assert subject_positions(tok, FMT, [EditRequest("x", "abc", "d")]) == [2]  # no subject: the last token


def test_a_one_layer_memit_edit_writes_the_target_values_at_the_edited_layer():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    config = MemitConfig(layers=(1,), mom2_weight=1e-6, v_steps=30, context_prefixes=0)
    positions = subject_positions(tok, FMT, EDITS)
    z, _ = target_values(model, tok, FMT, EDITS, 1, config, progress=False)  # deterministic
    _, before = keys_and_hidden(model, tok, FMT, EDITS, positions, 1, 1, 8)
    subject = batch_edit(model, tok, EDITS, FMT, TEXTS, config, progress=False)
    _, after = keys_and_hidden(model, tok, FMT, EDITS, positions, 1, 1, 8)
    assert (z - before).norm(dim=1).min() > 1e-2  # the values asked for are new
    assert torch.allclose(after, z, atol=1e-4 * z.abs().max())  # and the edited key now gives them
    with subject.unedited():
        _, restored = keys_and_hidden(model, tok, FMT, EDITS, positions, 1, 1, 8)
    assert torch.equal(restored, before)
    subject.restore()


def test_the_value_search_freezes_finished_rows_and_resumes_from_its_cached_batches():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    # the random tiny model's NLL floor is about 4 (one hidden state, char-level answers)
    config = MemitConfig(layers=(1,), v_steps=200, v_tol=5.0, batch_size=2, context_prefixes=0, kl_factor=0.0)
    z, record = target_values(model, tok, FMT, EDITS, 1, config, progress=False)
    assert record["v_converged"] == 1.0 and record["final_loss_mean"] < 5.0
    assert record["v_steps_mean"] < 200  # every batch stopped early
    shards = sorted(Path(record["values_cache"]).glob("values-*.safetensors"))
    assert len(shards) == 2  # 3 edits in batches of 2
    shards[1].unlink()  # as if killed before the last batch
    again, resumed = target_values(model, tok, FMT, EDITS, 1, config, progress=False)
    assert torch.equal(again, z)
    assert 0 < resumed["values_reused_edits"] < 3 and 0 < resumed["values_reused_s"] < resumed["values_search_s"]


def test_a_larger_run_searches_only_the_edits_no_earlier_run_searched():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    config = MemitConfig(layers=(1,), v_steps=200, v_tol=5.0, batch_size=2, context_prefixes=0)
    few = EDITS[:2]
    z_few, _ = target_values(model, tok, FMT, few, 1, config, progress=False)
    more = [EDITS[2], *few, EDITS[0]]  # a new edit, the old ones in another order, one listed twice
    z, record = target_values(model, tok, FMT, more, 1, config, progress=False)
    assert record["values_reused_edits"] == 3
    assert len(list(Path(record["values_cache"]).glob("values-*.safetensors"))) == 2  # one more batch, of one edit
    assert torch.equal(z[1:3], z_few) and torch.equal(z[3], z_few[0])
    # each edit's search is its own: the same values as searching all three together from scratch
    alone, _ = target_values(model, tok, FMT, EDITS, 1,
                             MemitConfig(layers=(1,), v_steps=200, v_tol=5.0, batch_size=3, context_prefixes=0),
                             progress=False)
    assert torch.allclose(alone, z[:3][[1, 2, 0]], atol=1e-4)


def test_value_searches_of_slices_in_turn_leave_the_batch_edit_only_the_solve(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    config = MemitConfig(layers=(1,), v_steps=200, v_tol=5.0, batch_size=2, context_prefixes=0)
    resolved, prefixes, z_first, _ = search_values(model, tok, EDITS[:2], FMT, config, progress=False)
    assert resolved.layers == (1,) and prefixes == []
    search_values(model, tok, EDITS[2:], FMT, config, progress=False)  # as a second process would
    subject = batch_edit(model, tok, EDITS, FMT, TEXTS, config, progress=False)
    assert subject.settings["values_reused_edits"] == 3
    edited = {k: model.get_submodule(k.rsplit(".", 1)[0]).weight.detach().clone() for k in subject.originals}
    subject.restore()
    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path / "fresh"))  # one search of all three, from scratch
    whole = batch_edit(model, tok, EDITS, FMT, TEXTS, config, progress=False)
    assert whole.settings["values_reused_edits"] == 0
    for k, w in edited.items():
        assert torch.allclose(model.get_submodule(k.rsplit(".", 1)[0]).weight, w, atol=1e-5)
    whole.restore()


def test_alphaedit_leaves_ordinary_text_keys_mapped_as_before():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    few = TEXTS[:2]  # few tokens: the key covariance has a real null space
    subject = batch_edit(model, tok, EDITS, FMT, few, MemitConfig(method="alphaedit", layers=(1,), null_threshold=1e-6),
                         progress=False)
    weight = model.model.layers[1].mlp.down_proj.weight
    original = subject.originals["model.layers.1.mlp.down_proj.weight"]
    from megedit.baselines.memit import _capture_keys
    from megedit.lm import left_pad

    batch = left_pad([tok(t)["input_ids"] for t in few], 0)
    with torch.no_grad(), _capture_keys(model, [1]) as keys:
        model(**batch.model_inputs, use_cache=False)
    k = keys[1][0][batch.mask.bool()]
    change = (weight - original) @ k.T
    assert (weight - original).abs().max() > 1e-4
    assert change.abs().max() < 1e-4 * (weight - original).abs().max() * k.abs().max() * k.shape[1]
    subject.restore()


def test_bad_settings():
    with pytest.raises(ConfigError, match="method"):
        MemitConfig(method="rome").validate()
    model, tok = tiny_model("llama"), char_tokenizer()
    with pytest.raises(ConfigError, match="below the last layer"):
        batch_edit(model, tok, EDITS, FMT, TEXTS, MemitConfig(layers=(2,)), progress=False)


def test_weight_deltas_save_and_load_onto_the_same_base_only(tmp_path):
    from megedit.errors import MeGError
    from megedit.runtime.subject import WeightEditSubject

    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    subject = batch_edit(model, tok, EDITS, FMT, TEXTS, MemitConfig(layers=(0, 1), v_steps=5), progress=False)
    subject.save(tmp_path / "memit.safetensors")
    edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    fresh = tiny_model("llama", init_range=0.2)
    loaded = WeightEditSubject.load(tmp_path / "memit.safetensors", fresh, tok)
    assert loaded.method == "memit" and loaded.settings["layers"] == [0, 1]
    for n, p in fresh.named_parameters():
        assert torch.allclose(p, edited[n], atol=1e-6)
    with pytest.raises(MeGError, match="another base model"):
        WeightEditSubject.load(tmp_path / "memit.safetensors", tiny_model("llama", seed=3), tok)


def test_keys_are_averaged_over_the_prompt_and_its_prefixed_copies():
    from megedit.baselines.memit import context_keys

    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    prefixes = ["Hi there.", "So it goes."]
    keys, hidden = context_keys(model, tok, FMT, EDITS, prefixes, 0, 1, 4)
    for i, r in enumerate(EDITS):
        copies = [r, *(EditRequest(r.case_id, f"{p} {r.prompt}", r.target, subject=r.subject) for p in prefixes)]
        k, h = keys_and_hidden(model, tok, FMT, copies, subject_positions(tok, FMT, copies), 0, 1, 4)
        assert torch.allclose(keys[i], k.mean(dim=0), atol=1e-6)
        assert torch.allclose(hidden[i], h[0], atol=1e-6)  # the gap is measured on the prompt alone


def _nll_after(model, tok, requests, z, last=1):
    """The targets' mean NLL with z written at each subject after layer `last`."""
    from megedit.baselines.memit import _at_subject, _row_nll, _run_shifted
    from megedit.baselines.ft import TrainingBatch

    tb = TrainingBatch.build([FMT.prompt_ids(r.prompt, tok) for r in requests],
                             [FMT.answer_ids(r.target, tok, with_stop=True) for r in requests], tok.pad_token_id, "cpu")
    base, pos = _at_subject(model, tb.batch, subject_positions(tok, FMT, requests), last)
    shift = z.float() - base[torch.arange(len(requests)), pos]
    with torch.no_grad():
        return _row_nll(tb, _run_shifted(model, tb.batch, base, pos, shift, last, tb.span)).mean()


def test_values_fitted_with_prefixes_carry_to_prefixed_prompts():
    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    prefixes = ["Hi there.", "So it goes.", "Well then."]
    plain = MemitConfig(layers=(1,), v_steps=60, v_tol=0.0, context_prefixes=0, kl_factor=0.0)
    z_plain, _ = target_values(model, tok, FMT, EDITS, 1, plain, progress=False)
    z_ctx, record = target_values(model, tok, FMT, EDITS, 1, plain, prefixes, progress=False)
    assert record["values_reused_edits"] == 0  # other prefixes: another cache
    unseen = [EditRequest(r.case_id, f"Oh no. {r.prompt}", r.target, subject=r.subject) for r in EDITS]
    assert _nll_after(model, tok, unseen, z_ctx) < _nll_after(model, tok, unseen, z_plain)


def test_the_kl_term_keeps_the_subjects_essence_closer_to_the_base_model():
    from megedit.baselines.memit import _Essence

    model, tok = tiny_model("llama", init_range=0.2), char_tokenizer()
    free = MemitConfig(layers=(1,), v_steps=60, v_tol=0.0, context_prefixes=0, kl_factor=0.0)
    held = replace(free, kl_factor=10.0)
    essence = _Essence(model, tok, FMT, EDITS, 1)
    kls = []
    for config in (free, held):
        z, _ = target_values(model, tok, FMT, EDITS, 1, config, progress=False)
        _, h = keys_and_hidden(model, tok, FMT, EDITS, subject_positions(tok, FMT, EDITS), 1, 1, 8)
        with torch.no_grad():
            kls.append(float(essence.kl((z - h).float(), torch.arange(len(EDITS))).sum()))
    assert kls[1] < kls[0]
    assert kls[0] > 0


def test_generic_text_reaches_its_token_count_and_is_cached(monkeypatch):
    from megedit.baselines import generic_text

    model, tok = tiny_model("llama"), char_tokenizer()
    texts = generic_text.sampled_text(model, tok, tokens=300, length=40, batch_size=4, progress=False)
    assert sum(len(tok(t)["input_ids"]) for t in texts) >= 300
    assert len(set(texts)) > 1  # sampled, not one text repeated

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(generic_text, "hf_generate", no_generation)
    assert generic_text.sampled_text(model, tok, tokens=300, length=40, batch_size=4, progress=False) == texts
