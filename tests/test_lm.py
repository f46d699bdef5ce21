import warnings

import pytest
import torch
from tiny import VOCAB, tiny_model

from megedit.lm import decode, layer_input, left_pad, length_batches, starting_at_layer
from megedit.neuron import attach_neuron

STOP = {5}


def _prompts(seed=0, lengths=(3, 6, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _reference_greedy(model, prompt, max_new):
    """Plain greedy decoding of one prompt with HF generate, cut after the first stop token."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0, eos_token_id=sorted(STOP))[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in STOP:
            return out[: i + 1]
    return out


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi", "qwen2"])
def test_draft_verified_decoding_equals_plain_greedy_whatever_the_draft(model_type):
    model = tiny_model(model_type)
    prompts = _prompts()
    expected = [_reference_greedy(model, p, 8) for p in prompts]
    random_drafts = _prompts(seed=1, lengths=(2, 0, 5, 3))
    exact_drafts = [list(e) for e in expected]
    half_right = [e[:3] + [7, 8] for e in expected]
    for drafts in ([[]] * 4, random_drafts, exact_drafts, half_right):
        out = decode(model, prompts, drafts, 8, STOP, pad_id=0)
        assert out.generated == expected
        assert [len(f) for f in out.forced] == [len(d[:8]) for d in drafts]


def test_forced_argmax_matches_single_full_forward():
    model = tiny_model("llama")
    prompts, drafts = _prompts(), _prompts(seed=2, lengths=(4, 1, 3, 2))
    out = decode(model, prompts, drafts, 10, STOP, pad_id=0)
    for p, d, forced in zip(prompts, drafts, out.forced):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + d])).logits[0]
        assert forced == logits[len(p) - 1 : len(p) + len(d) - 1].argmax(-1).tolist()


def test_rows_leave_the_batch_and_per_row_state_follows():
    model = tiny_model("llama")
    neuron = attach_neuron(model, 1)
    torch.manual_seed(0)
    ws = torch.randn(4, neuron.spec.size) * 0.5
    prompts = _prompts()
    singles = []
    for i, p in enumerate(prompts):
        neuron.set_weights(ws[i : i + 1])
        singles.append(decode(model, [p], [[]], 12, {9, 11, 13}, pad_id=0).generated[0])
    neuron.set_weights(ws)
    selections = []

    def select_rows(index):
        selections.append(index.tolist())
        neuron.set_weights(neuron.weights[index])

    out = decode(model, prompts, [[]] * 4, 12, {9, 11, 13}, pad_id=0, select_rows=select_rows)
    assert out.generated == singles
    if len({len(s) for s in singles}) > 1:  # rows finished at different steps, so some left early
        assert selections


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_step_by_step_decoding_passes_the_cache_under_its_current_name(model_type):
    """transformers 5.x renamed past_key_values to cache; the old name warns on every later call
    (it showed in `megedit generate` output even with --quiet)."""
    model = tiny_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = decode(model, _prompts(), [[]] * 4, 6, STOP, pad_id=0)
    assert [len(g) for g in out.generated] == [len(_reference_greedy(model, p, 6)) for p in _prompts()]


def test_length_batches_group_similar_lengths_and_cover_everything():
    batches = length_batches([3, 9, 1, 7, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_left_pad_positions_start_at_each_rows_first_token():
    b = left_pad([[4, 5], [6, 7, 8]], pad_id=0)
    assert b.ids.tolist() == [[0, 4, 5], [6, 7, 8]]
    assert b.positions.tolist() == [[0, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "phi", "gemma3_text", "gpt_neox", "qwen3"])
def test_starting_at_a_cached_layer_reproduces_the_full_forward(model_type):
    model = tiny_model(model_type)
    batch = left_pad(_prompts(), pad_id=0)
    with torch.no_grad():
        full = model(**batch.model_inputs).logits
        hidden = layer_input(model, 2, batch)
        with starting_at_layer(model, 2, hidden):
            upper = model(**batch.model_inputs).logits
    real = batch.mask.bool()
    torch.testing.assert_close(upper[real], full[real], atol=1e-5, rtol=1e-5)
    # the layer list is whole again afterwards
    with torch.no_grad():
        assert torch.equal(model(**batch.model_inputs).logits, full)
