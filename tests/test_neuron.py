import pytest
import torch
from tiny import CONFIGS, VOCAB, tiny_model

from megedit.arch import ARCHITECTURES, mlp_path
from megedit.errors import ConfigError, UnsupportedArchitectureError
from megedit.lm import cache_kwargs, output_cache
from megedit.neuron import VARIANTS, NeuronMLP, attach_neuron, neuron_spec

ARCHS = sorted(ARCHITECTURES)


def test_every_table_entry_has_a_tiny_model():
    assert sorted(CONFIGS) == ARCHS


def _ids(seed=0, rows=2, length=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=g)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("model_type", ARCHS)
def test_zero_weights_are_bitwise_noop_and_detach_restores(model_type):
    model = tiny_model(model_type)
    ids = _ids()
    base = _logits(model, ids)
    original = model.get_submodule(mlp_path(model, 1))

    neuron = attach_neuron(model, layer=1)
    assert isinstance(model.get_submodule(mlp_path(model, 1)), NeuronMLP)
    assert torch.equal(_logits(model, ids), base)  # attached, no weights

    neuron.set_weights(torch.zeros(2, neuron.spec.size))
    assert torch.equal(_logits(model, ids), base)  # w = 0 is exact

    neuron.set_weights(torch.randn(2, neuron.spec.size))
    changed = _logits(model, ids)
    assert (changed - base).abs().max() > 1e-3

    neuron.enabled = False
    assert torch.equal(_logits(model, ids), base)  # switched off is exact
    neuron.enabled = True

    assert neuron.detach() is original
    assert model.get_submodule(mlp_path(model, 1)) is original
    assert torch.equal(_logits(model, ids), base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vector_lengths_follow_the_documented_layout(variant):
    model = tiny_model("llama")
    spec = neuron_spec(model, 0, variant)
    assert spec.size == {"linear": 64, "activated": 65, "gated": 96}[variant]


def test_default_variant_is_linear_for_gated_and_activated_for_plain_mlps():
    assert neuron_spec(tiny_model("llama"), 0).variant == "linear"
    assert neuron_spec(tiny_model("gpt2"), 0).variant == "activated"
    assert neuron_spec(tiny_model("phi"), 0).size == 2 * 32 + 1


def test_linear_neuron_adds_exactly_u_times_a_dot_x():
    model = tiny_model("llama")
    mlp = model.get_submodule(mlp_path(model, 0))
    x = torch.randn(2, 5, 32)
    neuron = attach_neuron(model, 0, "linear")
    w = torch.randn(2, 64)
    neuron.set_weights(w)
    with torch.no_grad():
        got = model.get_submodule(mlp_path(model, 0))(x)
        expected = mlp(x) + (x @ w[:, :32].unsqueeze(-1)) * w[:, None, 32:]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_per_row_weights_match_single_runs_with_left_padding(model_type, variant):
    model = tiny_model(model_type)
    neuron = attach_neuron(model, 1, variant)
    torch.manual_seed(1)
    ws = torch.randn(3, neuron.spec.size)
    prompts = [_ids(s, 1, n)[0] for s, n in ((1, 4), (2, 7), (3, 5))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1

    neuron.set_weights(ws)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # absolute-position models need these
    batch_logits = _logits(model, ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        batch_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[:, width:]
    for i, p in enumerate(prompts):
        neuron.set_weights(ws[i])
        alone = _logits(model, p[None])
        torch.testing.assert_close(batch_logits[i, width - len(p) :], alone[0], atol=2e-4, rtol=1e-4)
        with torch.no_grad():
            gen = model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[0, len(p) :]
        assert torch.equal(batch_gen[i], gen)
    # the rows really differ from each other, so the check above is not vacuous
    assert not torch.equal(batch_gen[0], batch_gen[1]) or not torch.equal(batch_gen[1], batch_gen[2])


def test_gradients_reach_only_the_neuron_weights():
    model = tiny_model("llama")
    model.requires_grad_(False)
    neuron = attach_neuron(model, 1)
    w = (0.1 * torch.randn(2, neuron.spec.size)).requires_grad_()
    neuron.set_weights(w)
    loss = model(input_ids=_ids()).logits.logsumexp(-1).mean()
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_weights_broadcast_over_generate_expansion():
    model = tiny_model("llama")
    neuron = attach_neuron(model, 1)
    neuron.set_weights(torch.randn(1, neuron.spec.size))
    with torch.no_grad():
        out = model.generate(input_ids=_ids(0, 1, 4), max_new_tokens=3, num_beams=2, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert out.shape == (1, 7)


def test_applied_restores_previous_weights():
    model = tiny_model("llama")
    neuron = attach_neuron(model, 1)
    w = torch.randn(1, neuron.spec.size)
    neuron.set_weights(w)
    with neuron.applied(None):
        assert neuron.weights is None
    assert neuron.weights is w


def test_clear_errors_for_bad_use():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"layer must be an integer in \[0, 2\]"):
        attach_neuron(model, 3)
    neuron = attach_neuron(model, 0)
    with pytest.raises(ConfigError, match="already has a neuron"):
        attach_neuron(model, 0)
    with pytest.raises(ConfigError, match=r"shape \(rows, 64\), found \(2, 10\)"):
        neuron.set_weights(torch.zeros(2, 10))
    with pytest.raises(ConfigError, match="variant must be one of"):
        attach_neuron(model, 1, "quadratic")


def test_unknown_architecture_lists_the_supported_ones():
    model = tiny_model("llama")
    model.config.model_type = "bert"
    with pytest.raises(UnsupportedArchitectureError, match=r"'bert' is not supported; supported: gemma, .*llama"):
        attach_neuron(model, 0)


def test_activated_and_gated_neurons_follow_their_formulas():
    model = tiny_model("gpt2")
    mlp = model.get_submodule(mlp_path(model, 0))
    x = torch.randn(2, 5, 32)
    neuron = attach_neuron(model, 0, "activated")
    w = torch.randn(2, 65)
    neuron.set_weights(w)
    with torch.no_grad():
        got = model.get_submodule(mlp_path(model, 0))(x)
        pre = (x @ w[:, :32].unsqueeze(-1)) + w[:, None, 32:33]
        expected = mlp(x) + mlp.act(pre) * w[:, None, 33:]
    torch.testing.assert_close(got, expected)
    neuron.detach()

    neuron = attach_neuron(model, 0, "gated")
    w = torch.randn(2, 96)
    neuron.set_weights(w)
    with torch.no_grad():
        got = model.get_submodule(mlp_path(model, 0))(x)
        a, g, u = w[:, :32], w[:, 32:64], w[:, 64:]
        gate = mlp.act(x @ g.unsqueeze(-1))
        expected = mlp(x) + gate * (x @ a.unsqueeze(-1)) * u[:, None, :]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_quiet_neuron_runs_a_rows_opening_as_the_base_model_does(model_type):
    model = tiny_model(model_type)
    opening = [5, 6, 7]
    # left-padded: the first row begins with the opening, the second holds it but not at its start
    ids = torch.tensor([[0, 5, 6, 7, 8, 9], [0, 8, 5, 6, 7, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]] * 2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = {"input_ids": torch.tensor([[9], [9]]), "attention_mask": torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
           "position_ids": positions[:, -1:] + 1}

    def run(**kwargs):  # the prompts' logits, then one more step from their cache
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
            return out.logits, model(**nxt, **cache_kwargs(model, output_cache(out))).logits

    neuron = attach_neuron(model, 1, quiet_opening=True)
    neuron.quiet_on(opening)
    neuron.set_weights(torch.randn(2, neuron.spec.size))
    for kwargs in ({"position_ids": positions}, {}):  # positions given, or counted along the mask
        neuron.enabled = False
        base, base_step = run(**kwargs)
        neuron.enabled = True
        edited, step = run(**kwargs)
        torch.testing.assert_close(edited[0, 1:4], base[0, 1:4])  # the opening: as the base model
        assert not torch.allclose(edited[0, 4:], base[0, 4:], atol=1e-3)  # after it: edited
        assert not torch.allclose(edited[1, 1:2], base[1, 1:2], atol=1e-3)  # no opening first: edited throughout
        assert not torch.allclose(step, base_step, atol=1e-3)  # a later step (past the opening): edited


def test_only_a_spec_that_says_so_keeps_a_neuron_quiet_and_detaching_ends_it():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="quiet_opening=False"):
        attach_neuron(model, 1).quiet_on([5, 6])
    model = tiny_model("llama")
    neuron = attach_neuron(model, 1, quiet_opening=True)
    neuron.quiet_on([5, 6])
    assert neuron.spec.to_dict()["quiet_opening"] is True
    neuron.detach()
    assert not model.get_submodule("model")._forward_pre_hooks  # the hook went with the neuron
