"""The harness on a tiny random model with a real byte-level tokenizer."""

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from megedit.data import EditRequest, LocalityQuery
from megedit.data.prompts import PromptFormat, get_format
from megedit.eval import PlainSubject, WeightEditSubject, case_scores, evaluate
from megedit.eval.report import EvalReport
from megedit.lm import decode
from megedit.neuron import attach_neuron


def _requests(n=6):
    return [EditRequest(str(i), f"fact {i} is", f"t{i}", rephrases=(f"so fact {i} is",),
                        locality=(LocalityQuery(f"other {i} is"),)) for i in range(n)]


@pytest.fixture()
def lm():
    return tiny_model("llama"), char_tokenizer()


def test_unedited_model_has_full_locality_and_the_report_is_complete(lm, tmp_path):
    report = evaluate(lm, _requests(), batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    assert report.metrics["locality"] == {"ag": 100.0, "tf": 100.0}
    assert report.method == "none" and report.n == 6
    assert len(report.cases) == 18 and {c["kind"] for c in report.cases} == {"reliability", "generality", "locality"}
    assert report.protocol["prompt_format"]["name"] == "raw"
    loaded = EvalReport.load(report.save(tmp_path / "r.json"))
    assert loaded.metrics == report.metrics and loaded.cases == report.cases


def test_a_reports_rows_score_a_subset_of_its_edits_as_an_evaluation_of_those_alone(lm, tmp_path):
    reqs = _requests()
    run = dict(batch_size=4, max_new_tokens=6, progress=False, chat_edits=0)
    whole = evaluate(lm, reqs, **run, cache_dir=tmp_path / "a")
    assert case_scores(whole.cases) == {"n": 6, "metrics": whole.metrics, "score": whole.score}
    part = evaluate(lm, reqs[:3], **run, cache_dir=tmp_path / "b")
    assert case_scores(whole.cases, {"0", "1", "2"}) == {"n": 3, "metrics": part.metrics, "score": part.score}


def test_case_scores_average_the_chosen_edits_rows_per_kind():
    rows = [{"case_id": c, "kind": k, "ag": ag, "tf": tf} for c, k, ag, tf in [
        ("a", "reliability", True, 1.0), ("b", "reliability", False, 0.5), ("a", "generality", False, 0.25),
        ("b", "generality", True, 1.0), ("a", "locality", True, 1.0), ("a", "locality", False, 0.5),
        ("b", "locality", True, 1.0), ("a", "chat", True, 1.0)]]  # chat rows are no part of the Score
    a = case_scores(rows, {"a"})
    assert a["n"] == 1 and a["metrics"] == {"reliability": {"ag": 100.0, "tf": 100.0},
                                            "generality": {"ag": 0.0, "tf": 25.0},
                                            "locality": {"ag": 50.0, "tf": 75.0}}
    both = case_scores(rows)
    assert both["metrics"]["locality"] == {"ag": pytest.approx(200 / 3), "tf": pytest.approx(250 / 3)}
    assert both["score"] == pytest.approx(6 / (2 / 50 + 1 / 75 + 1 / 62.5 + 3 / 200 + 3 / 250))  # harmonic mean


def test_answers_equal_to_the_models_own_output_get_full_credit(lm, tmp_path):
    """Targets set to what the model itself generates must score 100 on AG and TF: checks the
    positive side of the harness end to end (token alignment, stopping, normalisation)."""
    model, tok = lm
    exact = PromptFormat("exact", answer_prefix="")  # the character tokenizer round-trips exactly
    probe = [EditRequest(str(i), f"fact {i} is", "x", rephrases=(f"so, fact {i} is",),
                         locality=(LocalityQuery("other"),)) for i in range(12)]
    first = evaluate(lm, probe, prompt_format=exact, max_new_tokens=5, progress=False, cache_dir=tmp_path)
    stops = {"\n", "<eos>", "<pad>"}
    answers = {}
    for r in probe:
        ids = exact.prompt_ids(r.prompt, tok)
        out = decode(model, [ids], [[]], 5, {1, 2}, pad_id=0).generated[0]
        text = tok.decode(out)
        if not any(s in text for s in stops) and text == text.strip():
            answers[r.case_id] = text
    assert len(answers) >= 3, "the random model should give a few plain answers"
    reqs = [EditRequest(r.case_id, r.prompt, answers[r.case_id], rephrases=r.rephrases, locality=r.locality)
            for r in probe if r.case_id in answers]
    report = evaluate(lm, reqs, prompt_format=exact, max_new_tokens=5, batch_size=2, progress=False,
                      cache_dir=tmp_path)
    assert report.metrics["reliability"] == {"ag": 100.0, "tf": 100.0}
    assert all(c["got"] == c["expected"] for c in report.cases if c["kind"] == "reliability")
    assert first.metrics["reliability"]["ag"] < 100.0  # ... while the dummy target "x" was not credited


def test_a_weight_edit_hurts_locality_and_unedited_restores_it_exactly(lm, tmp_path):
    model, tok = lm
    reqs = _requests()
    before = evaluate(lm, reqs, batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(torch.randn_like(param) * 5)
    subject = WeightEditSubject(model, tok, "noise", {name: original}, {"note": "random weight change"})
    after = evaluate(subject, reqs, batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    assert after.metrics["locality"]["tf"] < 100.0
    assert after.edit == {"note": "random weight change"}
    with subject.unedited():
        assert torch.equal(param, original)
    assert not torch.equal(param, original)
    subject.restore()
    again = evaluate(lm, reqs, batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    assert again.cases == before.cases


class _Killed(Exception):
    pass


class _CountingSubject(PlainSubject):
    """The unedited model, counting the batches it runs, killed at batch `kill_at` if given."""

    def __init__(self, model, tok, kill_at=None, note="a"):
        super().__init__(model, tok)
        self.batches, self.kill_at, self.note = 0, kill_at, note

    def batch_context(self, queries):
        self.batches += 1
        if self.batches == self.kill_at:
            raise _Killed
        return super().batch_context(queries)

    def describe(self):
        return {"note": self.note}


def test_a_killed_evaluation_resumes_from_its_checkpoint(lm, tmp_path, monkeypatch):
    from megedit.runtime.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "every_s", 0.0)  # save after every batch
    model, tok = lm
    reqs, settings = _requests(7), {"batch_size": 2, "max_new_tokens": 6, "progress": False, "cache_dir": tmp_path}
    full = evaluate(_CountingSubject(model, tok), reqs, **settings)  # caches the pre-edit locality reference
    checkpoint = tmp_path / "eval.partial.json"
    with pytest.raises(_Killed):
        evaluate(_CountingSubject(model, tok, kill_at=7), reqs, checkpoint=checkpoint, **settings)
    assert checkpoint.exists()
    resumed = _CountingSubject(model, tok)
    report = evaluate(resumed, reqs, checkpoint=checkpoint, **settings)
    assert resumed.batches == 12 - 6  # 4 batches per kind; the 6 finished before the kill are not rerun
    assert report.cases == full.cases and report.metrics == full.metrics and not checkpoint.exists()
    # a checkpoint of another subject is ignored, not mixed in
    with pytest.raises(_Killed):
        evaluate(_CountingSubject(model, tok, kill_at=7), reqs, checkpoint=checkpoint, **settings)
    other = _CountingSubject(model, tok, note="b")
    assert evaluate(other, reqs, checkpoint=checkpoint, **settings).cases == full.cases
    assert other.batches == 12


def test_a_killed_pre_edit_reference_resumes(lm, tmp_path, monkeypatch):
    from megedit.runtime.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "every_s", 0.0)
    model, tok = lm
    reqs, settings = _requests(7), {"batch_size": 2, "max_new_tokens": 6, "progress": False}
    full = evaluate(_CountingSubject(model, tok), reqs, cache_dir=tmp_path / "a", **settings)
    with pytest.raises(_Killed):  # the reference runs first: 4 batches, killed in the third
        evaluate(_CountingSubject(model, tok, kill_at=3), reqs, cache_dir=tmp_path / "b", **settings)
    assert list((tmp_path / "b").rglob("*.partial.json"))
    resumed = _CountingSubject(model, tok)
    report = evaluate(resumed, reqs, cache_dir=tmp_path / "b", **settings)
    assert resumed.batches == (4 - 2) + 12  # the two reference batches done before the kill are not rerun
    assert report.cases == full.cases and not list((tmp_path / "b").rglob("*.partial.json"))


def test_forked_processes_share_the_batches_and_score_the_same(lm, tmp_path):
    model, tok = lm
    reqs, settings = _requests(7), {"batch_size": 2, "max_new_tokens": 6, "progress": False}
    alone = evaluate(lm, reqs, cache_dir=tmp_path / "a", **settings)
    both = evaluate(lm, reqs, cache_dir=tmp_path / "b", processes=2, **settings)  # the reference in parts too
    assert both.cases == alone.cases and both.metrics == alone.metrics
    assert {k for k in both.timing} == {k for k in alone.timing} and both.timing["forward_pass_s"] > 0
    assert not list(tmp_path.rglob("*.part[0-9]*"))  # the parts' files are taken in and removed


def test_a_stopped_part_names_itself_and_its_finished_batches_are_kept(lm, tmp_path, monkeypatch):
    import json

    from megedit.errors import MeGError
    from megedit.runtime.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "every_s", 0.0)
    model, tok = lm
    reqs, settings = _requests(7), {"batch_size": 2, "max_new_tokens": 6, "progress": False, "cache_dir": tmp_path}
    full = evaluate(_CountingSubject(model, tok), reqs, **settings)  # caches the pre-edit reference
    checkpoint = tmp_path / "eval.partial.json"
    with pytest.raises(MeGError, match=r"evaluation \(reliability\): part 1 \(exit code 1\), part 2 \(exit code 1\) "
                                       r"of 2 stopped; rerun to resume"):  # each part dies in its second batch
        evaluate(_CountingSubject(model, tok, kill_at=2), reqs, checkpoint=checkpoint, processes=2, **settings)
    kept = json.loads(checkpoint.read_text())["kinds"]["reliability"]["rows"]
    assert len(kept) == 4 and not list(tmp_path.glob("*.part[0-9]*"))  # one batch of 2 rows from each part
    report = evaluate(_CountingSubject(model, tok), reqs, checkpoint=checkpoint, processes=2, **settings)
    assert report.cases == full.cases and not checkpoint.exists()


def test_per_row_neuron_subject_only_changes_its_own_rows(lm, tmp_path):
    """A subject that switches a neuron on for reliability queries only leaves locality exact."""
    model, tok = lm
    neuron = attach_neuron(model, 1)
    reqs = _requests()
    prompts = {r.prompt for r in reqs}

    class Routed(PlainSubject):
        method = "routed"

        @contextmanager
        def batch_context(self, queries):
            w = torch.stack([torch.randn(neuron.spec.size) * 3 if q.text in prompts else torch.zeros(neuron.spec.size)
                             for q in queries])
            with neuron.applied(w):
                yield lambda index: neuron.set_weights(neuron.weights[index])

    report = evaluate(Routed(model, tok), reqs, batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    assert report.metrics["locality"] == {"ag": 100.0, "tf": 100.0}
    base = evaluate(lm, reqs, batch_size=4, max_new_tokens=6, progress=False, cache_dir=tmp_path)
    rel = lambda r: [c["got"] for c in r.cases if c["kind"] == "reliability"]
    gen = lambda r: [c["got"] for c in r.cases if c["kind"] == "generality"]
    assert rel(report) != rel(base) and gen(report) == gen(base)


def test_a_token_budget_shorter_than_a_target_is_refused_in_one_line(lm, tmp_path):
    from megedit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^max_new_tokens 2 is shorter than the target of edit 0 \(3 tokens"):
        evaluate(lm, _requests(), max_new_tokens=2, progress=False, cache_dir=tmp_path)


def test_the_default_budget_is_20_tokens_or_the_longest_target(lm, tmp_path):
    long = [dataclasses.replace(r, target=r.target * 10) for r in _requests(2)]  # a sentence-long target
    assert "at most 20 new tokens" in evaluate(lm, _requests(2), progress=False, cache_dir=tmp_path).protocol["ag"]
    longest = max(len(" " + r.target) for r in long)  # a character a token
    assert longest > 20 and f"at most {longest} new tokens" in evaluate(lm, long, progress=False, cache_dir=tmp_path).protocol["ag"]


def test_locality_queries_a_subject_leaves_unchanged_get_full_credit_without_decoding(lm, tmp_path):
    """A neuron subject with zero vectors on the locality queries: neither they nor the unedited model on them
    are decoded, and the report's credits are the ones decoding them all gives."""
    from megedit.runtime.subject import NeuronSubject

    model, tok = lm
    neuron = attach_neuron(model, 1)
    reqs = _requests()
    changed = {r.prompt for r in reqs} | {reqs[0].locality[0].prompt}  # one locality query is changed
    decoded = []

    def vectors(queries):  # each query's own vector, whatever batch it is in
        return torch.stack([torch.randn(neuron.spec.size, generator=torch.Generator().manual_seed(len(q.text))) * 3
                            if q.text in changed else torch.zeros(neuron.spec.size) for q in queries])

    class Counting(NeuronSubject):
        def batch_context(self, queries):
            who = "edited" if self.neuron.enabled else "unedited"
            decoded.extend((who, q.text) for q in queries if q.kind == "locality")
            return super().batch_context(queries)

    subject = Counting(model, tok, neuron, vectors, "routed")
    settings = {"batch_size": 4, "max_new_tokens": 6, "progress": False, "cache_dir": tmp_path}
    fast = evaluate(subject, reqs, **settings)
    changed_locality = reqs[0].locality[0].prompt
    assert decoded == [("unedited", changed_locality), ("edited", changed_locality)]
    assert fast.protocol["counts"]["locality_unchanged"] == 5
    decoded.clear()
    full = evaluate(subject, reqs, decode_unchanged=True, **settings)
    assert len(decoded) == 12 and full.protocol["counts"]["locality_unchanged"] == 0
    assert fast.metrics == full.metrics
    locality = [(f, c) for f, c in zip(fast.cases, full.cases) if c["kind"] == "locality"]
    assert [c["ag"] for _, c in locality] == [False] + [True] * 5  # the changed one moved
    assert [f for f, c in zip(fast.cases, full.cases) if f != c] == [f for f, _ in locality[1:]]
    for f, c in locality[1:]:  # an unchanged query: the same credits, its texts not decoded
        assert f == {**c, "expected": None, "got": None} and c["got"] == c["expected"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_prefix_every_prompt_shares_runs_once_and_decodes_as_whole_prompts_do(model_type, monkeypatch):
    """A chat opening common to a batch's prompts is run once (its keys and values shared by every row): the same
    tokens as running every prompt whole, for the plain model and for a neuron quiet on that opening (per-row
    vectors acting on the tokens after it); a neuron that acts on every token shares nothing."""
    from megedit.runtime import decoding
    from megedit.runtime.subject import NeuronSubject, Query

    model, tok = tiny_model(model_type), char_tokenizer()
    g = torch.Generator().manual_seed(3)
    opening = torch.randint(6, 40, (10,), generator=g).tolist()
    prompts = [opening + torch.randint(6, 40, (n,), generator=g).tolist() for n in (3, 6, 4, 5, 2)]
    queries = [Query(str(i), "chat", f"q{i}", None) for i in range(len(prompts))]
    settings = decoding.DecodeSettings(get_format("raw"), max_new_tokens=8, batch_size=8, stops=(5,))
    neuron = attach_neuron(model, 1, quiet_opening=True)
    vectors = torch.randn(len(prompts), neuron.spec.size, generator=g) * 3
    routed = NeuronSubject(model, tok, neuron, lambda qs: vectors[[int(q.case_id) for q in qs]], "routed")
    plain = PlainSubject(model, tok)

    def run(subject):
        return decoding.run_queries(subject, queries, prompts, [[] for _ in prompts], settings, False, "chat").generated

    shared, real = [], decoding._shared_prefix
    monkeypatch.setattr(decoding, "_shared_prefix", lambda s, p: shared.append(real(s, p)) or shared[-1])
    with neuron.applied(None):
        plain_out = run(plain)
    acting = run(routed)  # the neuron acts on the opening too: nothing may be shared
    neuron.quiet_on(opening)
    quiet_out = run(routed)
    assert [prefix and prefix[1] for prefix in shared] == [10, None, 10]
    monkeypatch.setattr(decoding, "_shared_prefix", lambda s, p: None)  # every prompt run whole
    neuron.quiet_on(())
    assert run(routed) == acting
    with neuron.applied(None):
        assert run(plain) == plain_out
    neuron.quiet_on(opening)
    assert run(routed) == quiet_out != plain_out
