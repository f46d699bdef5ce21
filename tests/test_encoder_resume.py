"""Stage B's checkpoint: a training killed part-way resumes to exactly the weights and losses of
an uninterrupted run, doing only the batches that were not done."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_encoder

import megedit.stages.encoder as enc
from megedit.stages.encoder import CHECKPOINT, EncoderConfig, train_encoder

WORDS = ["river", "stone", "cloud", "maple", "ember", "frost", "amber", "delta", "orbit", "prism", "quill", "sable"]
QUERIES = [f"where is {WORDS[i % 12]} {WORDS[(i * 5 + 1) % 12]} found" for i in range(13)]
PARAPHRASES = [f"{WORDS[(i * 5 + 1) % 12]} and {WORDS[i % 12]}: location?" for i in range(13)]
REAL_INFO_NCE = enc.info_nce
CONFIG = EncoderConfig(epochs=2, batch_size=4, lr=3e-3, temperature=0.1)  # 13 pairs: 3 steps an epoch, a 1-pair rest


class Killed(Exception):
    pass


def _count_steps(monkeypatch, kill_at: int | None = None) -> list[int]:
    """Counts InfoNCE steps; raises (a 'kill') at step number `kill_at` (1-based), before it updates."""
    calls, real = [], REAL_INFO_NCE

    def counted(*args, **kwargs):
        calls.append(1)
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "info_nce", counted)
    return calls


def _train(folder=None, config=CONFIG, **kwargs):
    return train_encoder(tiny_encoder(layers=2), QUERIES, PARAPHRASES, config, progress=False,
                         checkpoint_dir=folder, **kwargs)


def _assert_same(a, b):
    (ta, ra), (tb, rb) = a, b
    assert ra.losses == rb.losses and len(ra.losses) == CONFIG.epochs
    sa, sb = ta.state_dict(), tb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted():
    return _train()


def test_a_checkpointed_run_equals_a_plain_one_and_removes_its_checkpoint(tmp_path, uninterrupted):
    result = _train(tmp_path)
    _assert_same(result, uninterrupted)
    assert not (tmp_path / CHECKPOINT).exists()  # the caller saves the result; the state is not kept
    assert "resumed_at" not in result[1].timing


def test_killed_in_the_second_epoch_resumes_from_the_first_epochs_checkpoint(tmp_path, monkeypatch, uninterrupted):
    _count_steps(monkeypatch, kill_at=5)  # epoch 2's second step
    with pytest.raises(Killed):
        _train(tmp_path, checkpoint_s=1e9)  # epoch ends only
    meta = json.loads(safe_open(str(tmp_path / CHECKPOINT), "pt").metadata()["megedit"])
    assert (meta["epoch"], meta["step"], len(meta["losses"])) == (1, 0, 1)
    calls = _count_steps(monkeypatch)
    resumed = _train(tmp_path, checkpoint_s=1e9)
    _assert_same(resumed, uninterrupted)
    assert len(calls) == 3  # epoch 2 alone
    assert resumed[1].timing["resumed_at"] == [1, 0]
    assert not (tmp_path / CHECKPOINT).exists()


def test_killed_mid_epoch_resumes_from_the_last_step_checkpoint_and_runs_only_the_rest(tmp_path, monkeypatch,
                                                                                       uninterrupted):
    _count_steps(monkeypatch, kill_at=3)  # epoch 1's third step; steps 1 and 2 are checkpointed
    with pytest.raises(Killed):
        _train(tmp_path, checkpoint_s=0)  # a checkpoint after every step
    calls = _count_steps(monkeypatch)
    resumed = _train(tmp_path, checkpoint_s=0)
    _assert_same(resumed, uninterrupted)
    assert len(calls) == 2 * 3 - 2 and resumed[1].timing["resumed_at"] == [0, 2]


def test_a_checkpoint_of_other_inputs_or_a_damaged_one_is_ignored(tmp_path, monkeypatch, uninterrupted):
    _count_steps(monkeypatch, kill_at=5)
    with pytest.raises(Killed):
        _train(tmp_path, config=EncoderConfig(epochs=2, batch_size=4, lr=1e-2, temperature=0.1))
    calls = _count_steps(monkeypatch)
    _assert_same(_train(tmp_path), uninterrupted)  # another lr: trained from the start
    assert len(calls) == 6
    (tmp_path / CHECKPOINT).write_bytes(b"not a safetensors file")
    calls.clear()
    _assert_same(_train(tmp_path), uninterrupted)
    assert len(calls) == 6
