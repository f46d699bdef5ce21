import dataclasses

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from megedit.data import EditRequest
from megedit.data.prompts import PromptFormat
from megedit.errors import ConfigError, MeGError
from megedit.lm import decode
from megedit.neuron import attach_neuron
from megedit.stages import fit_neurons as stage
from megedit.stages.fit_config import FitConfig, FitResult
from megedit.stages.fit_neurons import fit_neurons

FMT = PromptFormat("raw")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", init_range=0.2), char_tokenizer()


def _requests(n=6):
    return [EditRequest(str(i), f"q{i}:", "ab"[i % 2]) for i in range(n)]


def _config(**kw):
    return FitConfig(**{"layer": 1, "batch_size": 4, "max_steps": 40, "lr": 0.1, "margin": 0.0, **kw})


def test_batched_fitting_with_refills_equals_fitting_one_edit_at_a_time(lm):
    model, tok = lm  # no warm start: one edit a batch makes blocks of four edits, so other leaders
    batched = fit_neurons(model, tok, _requests(), FMT, _config(warm_start=False), progress=False)
    alone = fit_neurons(model, tok, _requests(), FMT, _config(batch_size=1, warm_start=False), progress=False)
    assert batched.success.any(), "some tiny edits should be learnable"
    assert torch.equal(batched.success, alone.success) and torch.equal(batched.steps, alone.steps)
    torch.testing.assert_close(batched.vectors, alone.vectors, atol=1e-4, rtol=1e-4)


def test_a_successful_vector_makes_greedy_decoding_produce_the_target_and_stop(lm):
    model, tok = lm
    result = fit_neurons(model, tok, _requests(), FMT, _config(), progress=False)
    neuron = attach_neuron(model, 1)
    try:
        for i, r in enumerate(_requests()):
            neuron.set_weights(result.vectors[i : i + 1])
            out = decode(model, [FMT.prompt_ids(r.prompt, tok)], [[]], 5, {1, 2}, pad_id=0).generated[0]
            assert (out == FMT.answer_ids(r.target, tok, with_stop=True)) == bool(result.success[i])
    finally:
        neuron.detach()
    assert result.steps[~result.success].eq(40).all()  # failures used the whole step budget


def test_every_edit_starts_from_the_same_seeded_vector(lm):
    model, tok = lm
    result = fit_neurons(model, tok, _requests(2), FMT, _config(max_steps=1, margin=1e9), progress=False)
    assert not result.success.any()
    start = result.vectors  # one Adam step from the common start: each coordinate moved by lr at most
    initial = attach_neuron(model, 1)
    spec = initial.spec
    initial.detach()
    assert (start - spec.initial_vector(0)).abs().max() <= 0.1 + 1e-6


def test_an_edit_whose_answer_an_earlier_edit_of_its_block_has_starts_from_that_edits_vector(lm, monkeypatch):
    model, tok = lm
    found = []
    fit_block = stage._FitState._fit_block  # the leaders each block is fitted with
    monkeypatch.setattr(stage._FitState, "_fit_block",
                        lambda self, neuron, queue, leaders, bar: found.append(leaders) or fit_block(self, neuron, queue,
                                                                                                    leaders, bar))
    requests = _requests(12)  # answers a and b, six edits each
    warm = fit_neurons(model, tok, requests, FMT, _config(), progress=False)
    cold = fit_neurons(model, tok, requests, FMT, _config(warm_start=False), progress=False)
    leaders = found[0]
    assert found[1:] == [{}] and len(leaders) == 10 and len(set(leaders.values())) == 2
    assert all(requests[i].target == requests[lead].target for i, lead in leaders.items())
    first = [i for i in range(12) if i not in leaders]  # they start from the initial vector either way
    torch.testing.assert_close(warm.vectors[first], cold.vectors[first], atol=1e-4, rtol=1e-4)
    followers = list(leaders)
    assert warm.steps[followers].sum() < cold.steps[followers].sum()
    assert warm.success[followers].sum() >= cold.success[followers].sum()


def test_edits_of_one_answer_share_a_block_behind_its_first_edit(lm, monkeypatch):
    model, tok = lm
    monkeypatch.setattr(stage, "BLOCK_BATCHES", 1)  # blocks of 4 edits
    # answers a and b alternate, prompt lengths mixed: sorted by prompt length they would share both blocks
    requests = [EditRequest(str(i), f"q{i}" + "x" * (i % 3) + ":", "ab"[i % 2]) for i in range(8)]
    neuron = attach_neuron(model, 1)
    try:
        warm, cold = (stage._FitState(model, tok, requests, [()] * 8, FMT, _config(warm_start=on), neuron.spec, None)
                      for on in (True, False))
    finally:
        neuron.detach()
    assert [{requests[i].target for i in block} for block in warm.blocks] == [{"a"}, {"b"}]
    for block in warm.blocks:  # the first edit leads the three others, which start from its vector
        assert set(warm._leaders(block)) == set(block[1:])
    lengths = [[len(warm.seqs[i][0]) for i in block[1:]] for block in warm.blocks]
    assert all(ls == sorted(ls) for ls in lengths)  # the followers keep the fitting order
    assert cold.blocks == [sorted(b, key=lambda i: (len(cold.seqs[i][0]), cold.digests[i], i)) for b in warm.blocks]


def test_an_edit_whose_target_an_earlier_fit_gave_starts_from_that_vector(lm):
    model, tok = lm
    neuron = attach_neuron(model, 1)
    initial = neuron.spec.initial_vector(0)
    neuron.detach()
    earlier = {"a": initial + 0.5, "b": initial - 0.5}
    one_step = _config(max_steps=1, margin=1e9)  # nothing passes: each vector is one Adam step from its start
    warm = fit_neurons(model, tok, _requests(4), FMT, one_step, progress=False, starts=earlier)
    off = fit_neurons(model, tok, _requests(4), FMT, dataclasses.replace(one_step, warm_start=False),
                      progress=False, starts=earlier)
    for i, target in ((0, "a"), (1, "b")):  # the first edit of each target: the earlier fit's vector, at warm_lr
        assert (warm.vectors[i] - earlier[target]).abs().max() <= one_step.warm_lr + 1e-6
    for i in (2, 3):  # their leaders failed: the initial vector
        assert (warm.vectors[i] - initial).abs().max() <= one_step.lr + 1e-6
    assert (off.vectors - initial).abs().max() <= one_step.lr + 1e-6  # warm_start off: no start is used


def test_a_stalled_edit_starts_again_from_the_initial_vector_at_the_restart_lr(lm):
    model, tok = lm
    low = fit_neurons(model, tok, _requests(), FMT, _config(warm_start=False), progress=False)
    # a learning rate far too large for 5 steps, then each edit still unfitted starts again at 0.1 (from the initial
    # vector: no warm start, so that every edit started there in the first place)
    restarted = fit_neurons(model, tok, _requests(), FMT, _config(lr=50.0, restart_steps=5, restart_lr=0.1,
                                                                   max_steps=45, warm_start=False), progress=False)
    again = restarted.steps > 5
    assert again.sum() >= 3, "lr 50 should leave most tiny edits unfitted after 5 steps"
    # from the restart on, each such edit walks the lr-0.1 fit's path: 5 steps later, to the same vector
    assert torch.equal(restarted.steps[again], low.steps[again] + 5)
    assert torch.equal(restarted.success[again], low.success[again])
    torch.testing.assert_close(restarted.vectors[again], low.vectors[again], atol=1e-4, rtol=1e-4)


def test_killed_run_resumes_from_its_shards(lm, tmp_path, monkeypatch):
    model, tok = lm
    first = fit_neurons(model, tok, _requests(), FMT, _config(), progress=False, work_dir=tmp_path)
    shards = sorted(tmp_path.glob("fit-*/shard-*.safetensors"))
    assert shards
    calls = []
    original_step = stage._FitState._step
    monkeypatch.setattr(stage._FitState, "_step", lambda self, *a: calls.append(1) or original_step(self, *a))
    again = fit_neurons(model, tok, _requests(), FMT, _config(), progress=False, work_dir=tmp_path)
    assert not calls  # everything came from the shards
    assert torch.equal(again.vectors, first.vectors) and torch.equal(again.success, first.success)
    shards[-1].unlink()  # as if killed before the last shard was written
    partial = fit_neurons(model, tok, _requests(), FMT, _config(), progress=False, work_dir=tmp_path)
    assert calls and torch.allclose(partial.vectors, first.vectors, atol=1e-5)


def test_a_larger_edit_set_fits_only_its_new_edits(lm, tmp_path, monkeypatch):
    model, tok = lm
    edits = _requests()
    first = fit_neurons(model, tok, edits[1:], FMT, _config(), progress=False, work_dir=tmp_path)
    fitted = []
    original_step = stage._FitState._step
    monkeypatch.setattr(stage._FitState, "_step",
                        lambda self, neuron, w, opt, live, slots, *a: fitted.extend(slots[r] for r in live)
                        or original_step(self, neuron, w, opt, live, slots, *a))
    more = fit_neurons(model, tok, edits, FMT, _config(), progress=False, work_dir=tmp_path)
    assert set(fitted) == {0}  # only the new edit went through the optimiser
    assert torch.equal(more.vectors[1:], first.vectors) and torch.equal(more.success[1:], first.success)
    assert more.timing["reused_edits"] == len(edits) - 1 and 0 < more.timing["reused_s"] <= first.timing["total_s"]
    alone = fit_neurons(model, tok, edits[:1], FMT, _config(), progress=False)
    assert torch.allclose(more.vectors[0], alone.vectors[0], atol=1e-5)


def test_parts_fitted_apart_make_up_the_whole_set_to_the_bit(lm, tmp_path, monkeypatch):
    model, tok = lm
    edits = _requests(8)
    monkeypatch.setattr(stage, "BLOCK_BATCHES", 1)  # blocks of 2 edits: 4 blocks dealt to 3 parts
    parts = [fit_neurons(model, tok, edits, FMT, _config(batch_size=2), progress=False, work_dir=tmp_path,
                         part=(k, 3)) for k in range(3)]
    assert [len(p.case_ids) for p in parts] == [2, 2, 4]  # in turns: blocks 0, 1, 2, then 3 to the last part
    ids = [c for p in parts for c in p.case_ids]
    assert sorted(ids) == sorted(r.case_id for r in edits) and all(p.case_ids for p in parts)  # disjoint, complete
    calls = []
    original_step = stage._FitState._step
    monkeypatch.setattr(stage._FitState, "_step", lambda self, *a: calls.append(1) or original_step(self, *a))
    whole = fit_neurons(model, tok, edits, FMT, _config(batch_size=2), progress=False, work_dir=tmp_path)
    assert not calls and whole.timing["reused_edits"] == len(edits)  # every edit came from the parts' shards
    alone = fit_neurons(model, tok, edits, FMT, _config(batch_size=2), progress=False)
    assert torch.equal(whole.success, alone.success) and torch.equal(whole.steps, alone.steps)
    assert torch.equal(whole.vectors, alone.vectors)  # each block fitted from an empty batch, wherever it ran
    with pytest.raises(ConfigError, match="part"):
        fit_neurons(model, tok, edits, FMT, _config(), progress=False, part=(0, 2))  # no work_dir to share


def test_processes_fit_the_parts_side_by_side_and_collect_them(lm, tmp_path, monkeypatch):
    model, tok = lm
    edits = _requests(8)
    monkeypatch.setattr(stage, "BLOCK_BATCHES", 1)
    both = fit_neurons(model, tok, edits, FMT, _config(), progress=False, work_dir=tmp_path, processes=2)
    assert both.case_ids == [r.case_id for r in edits] and both.timing["processes"] == 2
    assert both.timing["forked_edits"] == len(edits) and both.timing["reused_edits"] == 0  # the parts fitted them all
    assert len(list(tmp_path.glob("fit-*/shard-*.safetensors"))) == 2  # one per part
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the parts: the same float sums
    try:
        alone = fit_neurons(model, tok, edits, FMT, _config(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(both.success, alone.success) and torch.equal(both.vectors, alone.vectors)
    with pytest.raises(ConfigError, match="processes needs"):
        fit_neurons(model, tok, edits, FMT, _config(), progress=False, processes=2)  # no work_dir to share


def test_a_part_that_stops_is_named_and_the_rerun_resumes(lm, tmp_path, monkeypatch):
    import os

    model, tok = lm
    edits = _requests(6)
    monkeypatch.setattr(stage, "BLOCK_BATCHES", 1)  # blocks of 4 edits: each part has one
    original_run = stage._FitState.run

    def run(self, neuron, progress):  # the second part dies at once, as if killed
        if self.part and self.part[0] == 1:
            os._exit(9)
        return original_run(self, neuron, progress)

    monkeypatch.setattr(stage._FitState, "run", run)
    with pytest.raises(MeGError, match=r"stage A: part 2 \(exit code 9\) of 2 stopped; rerun"):
        fit_neurons(model, tok, edits, FMT, _config(), progress=False, work_dir=tmp_path, processes=2)
    [first] = tmp_path.glob("fit-*/shard-*.safetensors")  # part 1 finished and wrote its edits
    written = first.read_bytes()
    monkeypatch.setattr(stage._FitState, "run", original_run)
    again = fit_neurons(model, tok, edits, FMT, _config(), progress=False, work_dir=tmp_path, processes=2)
    reused, forked = again.timing["reused_edits"], again.timing["forked_edits"]
    assert reused > 0 and forked > 0 and reused + forked == len(edits)  # part 1's edits are not fitted again
    assert len(list(tmp_path.glob("fit-*/shard-*.safetensors"))) == 2 and first.read_bytes() == written


def test_result_round_trips_through_safetensors(lm, tmp_path):
    model, tok = lm
    result = fit_neurons(model, tok, _requests(3), FMT, _config(optimizer="sgd", lr=0.5), progress=False)
    loaded = FitResult.load(result.save(tmp_path / "fit.safetensors"))
    assert loaded.case_ids == result.case_ids and loaded.spec == result.spec and loaded.config == result.config
    assert torch.equal(loaded.vectors, result.vectors) and torch.equal(loaded.success, result.success)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        FitConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="max_steps must be >= 1, found 0"):
        FitConfig(max_steps=0)


def test_an_edit_wording_longer_than_the_limit_is_refused_in_one_line_before_fitting(lm, monkeypatch):
    from megedit.errors import MeGError

    model, tok = lm
    steps = []
    monkeypatch.setattr(stage._FitState, "_step", lambda self, *a: steps.append(1))
    edits = [*_requests(2), EditRequest("long", "q" * 40 + ":", "a")]
    with pytest.raises(MeGError, match=r"^edit long: wording 0 \(with its answer\) is 44 tokens long; the limit is 20") as err:
        fit_neurons(model, tok, edits, FMT, _config(max_prompt_tokens=20), progress=False)
    assert "\n" not in str(err.value) and not steps
    with pytest.raises(MeGError, match="wording 1"):  # other wordings too
        fit_neurons(model, tok, _requests(1), FMT, _config(max_prompt_tokens=20), progress=False, variants=[["x" * 30]])


def test_the_chat_wording_takes_its_system_message_from_the_config():
    class Templated:  # a tokenizer with a chat template
        chat_template = "{{ messages }}"

    assert stage.chat_wording(_config(chat_wording=False), FMT, Templated()) is None
    assert stage.chat_wording(_config(), PromptFormat("chat", chat=True), Templated()) is None  # chats already
    assert stage.chat_wording(_config(), FMT, Templated()).system is None  # the template's own default
    assert stage.chat_wording(_config(chat_system=""), FMT, Templated()).system == ""


def test_the_chat_wording_answers_with_every_other_wordings_tokens_when_asked(lm, monkeypatch):
    model, tok = lm
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE, raising=False)
    for space in (False, True):
        chat = stage.chat_wording(_config(chat_answer_space=space), FMT, tok)
        _, [[prompt_answer, chat_answer]], [kinds] = stage._encode(_requests(1), [()], tok, FMT, chat)
        assert kinds == [False, True]
        # the answers before their stops: the bare target's tokens differ from the ones after a space
        assert (prompt_answer[:-1] == chat_answer[:-1]) is space
        assert chat_answer[:-1] == tok(" " * space + _requests(1)[0].target, add_special_tokens=False)["input_ids"]


CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_rows_after_a_shared_opening_fit_as_whole_rows_do_and_decode_to_their_target(lm, monkeypatch):
    model, tok = lm
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE, raising=False)
    chat, config = PromptFormat("chat", chat=True, answer_prefix=""), _config(max_steps=80)
    opening = stage.quiet_opening(config, chat, tok)
    assert tok.decode(opening) == "[user]"
    shared = fit_neurons(model, tok, _requests(), chat, config, progress=False)
    monkeypatch.setattr(stage, "prefix_cache", lambda model, ids: None)  # every row whole, the hook keeps the opening quiet
    whole = fit_neurons(model, tok, _requests(), chat, config, progress=False)
    assert shared.success.any()
    assert torch.equal(shared.success, whole.success) and torch.equal(shared.steps, whole.steps)
    torch.testing.assert_close(shared.vectors, whole.vectors, atol=1e-4, rtol=1e-4)
    assert 0 < shared.timing["trained_tokens"] < whole.timing["trained_tokens"]
    neuron = attach_neuron(model, 1, quiet_opening=True)
    neuron.quiet_on(opening)
    try:
        for i, r in enumerate(_requests()):
            neuron.set_weights(shared.vectors[i : i + 1])
            out = decode(model, [chat.prompt_ids(r.prompt, tok)], [[]], 5, {1}, pad_id=0).generated[0]
            assert (out == chat.answer_ids(r.target, tok, with_stop=True)) == bool(shared.success[i])
    finally:
        neuron.detach()
    assert shared.spec.quiet_opening and not fit_neurons(
        model, tok, _requests(1), chat, _config(max_steps=1, quiet_chat_opening=False), progress=False).spec.quiet_opening
