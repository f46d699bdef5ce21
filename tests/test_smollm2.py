"""Real end-to-end checks on the embedded SmolLM2-135M-Instruct (float32, CPU)."""

import time

import pytest
import torch

from megedit import attach_neuron, load_model
from megedit.arch import num_layers

pytestmark = pytest.mark.slow


def test_embedded_model_loads_from_the_cache_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and num_layers(model) == 30
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    start = time.perf_counter()
    load_model("smollm2", device="cpu")  # the float32 copy is cached by now
    assert time.perf_counter() - start < 20
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])


def test_a_static_neuron_learns_a_counterfactual_capital(smollm2):
    model, tokenizer = smollm2
    prompt, target = "The capital of France is", " Rome"
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    target_ids = tokenizer(target, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, target_ids], dim=1)
    n_prompt = prompt_ids.shape[1]

    neuron = attach_neuron(model, layer=8)
    try:
        w = neuron.spec.initial_vector(seed=0).unsqueeze(0).requires_grad_()
        neuron.set_weights(w)
        optimiser = torch.optim.Adam([w], lr=0.1)
        steps_used = None
        for step in range(1, 51):
            logits = model(input_ids=ids).logits[0, n_prompt - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits, target_ids[0])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                predicted = model(input_ids=ids).logits[0, n_prompt - 1 : -1].argmax(-1)
            if torch.equal(predicted, target_ids[0]):
                steps_used = step
                break
        assert steps_used is not None and steps_used < 50
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, max_new_tokens=2, do_sample=False)
        assert tokenizer.decode(out[0, n_prompt:]).strip().startswith("Rome")
        with torch.no_grad(), neuron.applied(None):  # without the vector it is Paris again
            out = model.generate(input_ids=prompt_ids, max_new_tokens=2, do_sample=False)
        assert "Paris" in tokenizer.decode(out[0, n_prompt:])
    finally:
        neuron.detach()


def test_unedited_model_on_counterfact_keeps_locality_and_misses_the_new_targets(smollm2, shared_data, tmp_path):
    from megedit import evaluate, load_requests

    requests = load_requests("counterfact", shared_data / "counterfact/counterfact-edit.json", limit=16)
    report = evaluate(smollm2, requests, data_kind="counterfact", progress=False, cache_dir=tmp_path, chat_edits=0)
    assert report.metrics["locality"] == {"ag": 100.0, "tf": 100.0}
    assert report.metrics["reliability"]["ag"] == 0.0 and report.score == 0.0
    first = report.cases[0]
    assert first["query"] == "The mother tongue of Danielle Darrieux is" and first["got"] == "French"


def test_fitted_neurons_carry_their_edits_through_the_harness(smollm2, shared_data, tmp_path):
    from megedit import evaluate, load_requests
    from megedit.data.prompts import get_format
    from megedit.stages.fit_config import FitConfig
    from megedit.stages.fit_neurons import fit_neurons, fitted_subject

    model, tokenizer = smollm2
    requests = load_requests("counterfact", shared_data / "counterfact/counterfact-edit.json", limit=8)
    result = fit_neurons(model, tokenizer, requests, get_format("raw"), FitConfig(), progress=False)
    assert result.spec.layer == 24
    assert result.success_rate == 100.0 and result.steps.max() < 50
    subject = fitted_subject(model, tokenizer, result)
    try:
        report = evaluate(subject, requests, data_kind="counterfact", progress=False, cache_dir=tmp_path,
                          chat_edits=0)
    finally:
        subject.neuron.detach()
    assert report.metrics["reliability"] == {"ag": 100.0, "tf": 100.0}
    assert report.cases[0]["got"] == "English"  # Danielle Darrieux's mother tongue, edited


def test_ft_baseline_learns_edits_and_restores_the_exact_base(smollm2, shared_data, tmp_path):
    from megedit import evaluate, load_requests
    from megedit.baselines.ft import FTConfig, fine_tune
    from megedit.data.prompts import get_format

    model, tokenizer = smollm2
    before = {n: p.clone() for n, p in model.named_parameters() if ".24.mlp." in n}
    requests = load_requests("counterfact", shared_data / "counterfact/counterfact-edit.json", limit=8)
    subject = fine_tune(model, tokenizer, requests, get_format("raw"), FTConfig(epochs=15, batch_size=8),
                        progress=False)
    try:
        losses = subject.settings["epoch_losses"]
        assert losses[-1] < losses[0] / 2
        report = evaluate(subject, requests, data_kind="counterfact", progress=False, cache_dir=tmp_path,
                          chat_edits=0)
        assert report.metrics["reliability"]["tf"] > 50.0
        assert report.method == "ft" and report.edit["trained"] == "model.layers.24.mlp"  # MeG's default layer
    finally:
        subject.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
