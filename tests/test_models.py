import pytest
import torch

from megedit.errors import ModelLoadError
from megedit.models import cache_root, load_encoder, load_model, model_fingerprint


def test_cache_root_follows_megedit_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path / "m"))
    assert cache_root() == tmp_path / "m"
    monkeypatch.delenv("MEGEDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "megedit"


def test_a_missing_local_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"could not load '.*empty'"):
        load_model(str(tmp_path / "empty"))


def test_local_folder_round_trip_and_fingerprint(tmp_path):
    from tiny import char_tokenizer, tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), device="cpu")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert model_fingerprint(loaded) == model_fingerprint(model)
    with torch.no_grad():
        next(loaded.parameters()).add_(1e-3)
    assert model_fingerprint(loaded) != model_fingerprint(model)


def test_embedded_encoder_mean_pools_to_unit_vectors_that_match_paraphrases():
    encoder = load_encoder("minilm", device="cpu")
    texts = ["The capital of France is", "France's capital city is", "Bananas are rich in potassium"]
    e = encoder.encode(texts)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    batch = encoder.tokenize(texts[:1])
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state[0]
    manual = torch.nn.functional.normalize(hidden.mean(0), dim=0)  # one sentence: no padding to mask
    torch.testing.assert_close(e[0], manual, atol=1e-5, rtol=1e-5)
