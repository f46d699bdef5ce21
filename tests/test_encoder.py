import math

import pytest
import torch

from megedit.data.requests import EditRequest
from megedit.errors import ConfigError, MeGError
from megedit.lm import starting_at_layer
from megedit.stages.encoder import (EncoderConfig, _CachedInputs, info_nce, load_encoder_delta, retrieval_top1,
                                    save_encoder_delta, train_encoder, trainable_parameters, training_triples)
from tiny import tiny_encoder

WORDS = ["river", "stone", "cloud", "maple", "ember", "frost", "amber", "delta", "orbit", "prism", "quill", "sable"]


def _pairs(n: int = 12):
    """Queries and paraphrases that share two content words, in another order and wording."""
    queries = [f"where is {WORDS[i % 12]} {WORDS[(i * 5 + 1) % 12]} found" for i in range(n)]
    paraphrases = [f"{WORDS[(i * 5 + 1) % 12]} and {WORDS[i % 12]}: location?" for i in range(n)]
    return queries, paraphrases


def test_cached_lower_layers_give_the_same_embeddings_as_a_full_pass():
    encoder = tiny_encoder(layers=3)
    texts = ["a short one", "a somewhat longer sentence here", "x"]
    cache = _CachedInputs(encoder, texts, first_trained=2)
    inputs, hidden = cache.batch(texts, encoder.tokenizer.pad_token_id)
    with torch.no_grad(), starting_at_layer(encoder.model, 2, hidden):
        cached = encoder(**inputs)
    assert torch.allclose(cached, encoder.encode(texts), atol=1e-6)
    assert len(encoder.model.encoder.layer) == 3  # the full stack is back


def test_info_nce_matches_the_formula():
    q = torch.eye(4)
    loss = info_nce(q.clone(), q, temperature=0.5)
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 3)), abs=1e-6)


def test_training_triples_use_every_rephrase_once():
    requests = [EditRequest("1", "q1", "t", rephrases=("p1", "p1b")), EditRequest("2", "q1", "t", rephrases=("p1",)),
                EditRequest("3", "q3", "t")]
    assert training_triples(requests, EncoderConfig(hard_negatives=0)) == (["q1", "q1"], ["p1", "p1b"], [(), ()])


def test_retrieval_top1_counts_own_original_nearest():
    class Fixed:
        def encode(self, texts):
            table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "pa": [0.9, 0.1], "pb": [0.8, 0.2]}
            return torch.nn.functional.normalize(torch.tensor([table[t] for t in texts]), dim=-1)

    assert retrieval_top1(Fixed(), ["a", "b"], ["pa", "pb"]) == 50.0


def test_training_moves_paraphrases_to_their_originals_and_touches_only_the_top_layer():
    base = tiny_encoder(layers=2)
    before = {n: p.clone() for n, p in base.named_parameters()}
    queries, paraphrases = _pairs()
    tuned, training = train_encoder(base, queries, paraphrases,
                                    EncoderConfig(epochs=30, batch_size=8, lr=3e-3, temperature=0.1), progress=False)
    assert training.losses[-1] < training.losses[0] / 2
    assert retrieval_top1(base, queries, paraphrases) < 80 and retrieval_top1(tuned, queries, paraphrases) == 100
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the base is untouched
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layer.1." in n for n in changed)
    assert not any(p.requires_grad for p in tuned.parameters())


def test_delta_round_trip_and_mismatch(tmp_path):
    base = tiny_encoder(layers=2)
    queries, paraphrases = _pairs(8)
    tuned, training = train_encoder(base, queries, paraphrases, EncoderConfig(epochs=2, batch_size=4, lr=1e-3),
                                    progress=False)
    path = save_encoder_delta(tuned, training, "tiny", tmp_path / "encoder.safetensors")
    assert set(trainable_parameters(tuned, 1)) == set(__import__("safetensors.torch").torch.load_file(str(path)))
    loaded, meta = load_encoder_delta(path, base)
    assert torch.equal(loaded.encode(queries), tuned.encode(queries)) and meta["base_encoder"] == "tiny"
    with pytest.raises(MeGError, match="do not match"):
        load_encoder_delta(path, tiny_encoder(layers=3))


def test_bad_encoder_settings_are_config_errors():
    with pytest.raises(ConfigError, match="temperature"):
        EncoderConfig(temperature=0).validate()
    with pytest.raises(ConfigError, match="at least 2"):
        train_encoder(tiny_encoder(), ["a"], ["b"], progress=False)
    with pytest.raises(ConfigError, match="top 5"):
        trainable_parameters(tiny_encoder(layers=2), 5)
