"""Specificity prompts and negatives (data/specificity.py), chat scoring (eval/chat.py), the two new
query kinds in the harness, and the router's negatives."""

import dataclasses
import json

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from megedit.data import EditRequest, LocalityQuery, load_requests
from megedit.data.specificity import (PLAIN_SUBJECT_PROMPTS, negative_prompts, relation_wordings, wording_half,
                                      with_specificity)
from megedit.data.wordings import relation_template
from megedit.errors import ConfigError
from megedit.eval import evaluate
from megedit.eval.chat import holds_target, is_degenerate
from megedit.stages.router import Router, RouterConfig
from megedit.stages.routing import RoutingConfig, calibration_embeddings, edit_negatives

WORDINGS = {  # relation -> (wordings, answers)
    "language": (["The mother tongue of {} is", "{} is a native speaker of", "{} speaks"], ["French", "English"]),
    "city": (["{} was born in", "The birthplace of {} is", "{} comes from the city of"], ["Paris", "Rome"]),
    "job": (["{} works as a", "The profession of {} is", "{}'s occupation is"], ["actor", "poet"]),
    "sport": (["{} plays the sport of", "The sport of {} is"], ["soccer", "tennis"]),
    "label": (["{} is signed to", "The record label of {} is"], ["Sony", "EMI"]),
    "genre": (["The genre of {} is", "{} performs"], ["jazz", "opera"]),
}


def _pool():
    records = []
    for rel, (wordings, answers) in WORDINGS.items():
        for w in wordings:
            for k, answer in enumerate(answers):
                subject = f"{rel.title()} Person {w[:3]}{k}"
                records.append(EditRequest(f"{rel}-{len(records)}", w.format(subject), answer, subject,
                                           rephrases=(f"In short, {w.format(subject)}",)))
    return records


def test_wordings_with_the_same_answers_are_one_relation():
    wordings = relation_wordings(_pool())
    for rel, (ws, _) in WORDINGS.items():
        assert len({wordings.relation[w] for w in ws}) == 1, rel
    assert len(set(wordings.relation.values())) == len(WORDINGS)


def test_probes_ask_other_relations_and_never_a_negative_wording():
    pool = _pool()
    edits = [EditRequest("e1", "The mother tongue of Ann Smith is", "German", "Ann Smith"),
             EditRequest("e2", "Ann Smith was born in", "Oslo", "Ann Smith"),
             EditRequest("e3", "Bob Lee works as a", "pilot", "Bob Lee")]
    probed = with_specificity(edits, pool, per_edit=3)
    negatives = negative_prompts(edits, pool, per_edit=6, plain=0)
    wordings = relation_wordings(pool)
    for edit, negs in zip(probed, negatives):
        asked = {wordings.relation[relation_template(p, edit.subject)] for p in edit.specificity}
        refused = {wordings.relation[w] for e in edits if e.subject == edit.subject
                   for w in [relation_template(e.prompt, e.subject)]}
        assert edit.specificity and not asked & refused  # another question, about the same subject
        assert all(edit.subject in p for p in edit.specificity)
        assert all(wording_half(relation_template(p, edit.subject)) == "probe" for p in edit.specificity)
        assert all(wording_half(relation_template(p, edit.subject)) == "negative" for p in negs)
    assert with_specificity(edits, pool, per_edit=3) == probed  # seeded, not random
    given = EditRequest("e4", "Bob Lee works as a", "pilot", "Bob Lee", specificity=("Bob Lee is tall?",))
    assert with_specificity([given], pool)[0].specificity == ("Bob Lee is tall?",)  # the user's own are kept


def test_negatives_add_plain_prompts_about_the_subject_and_none_without_a_subject():
    edits = [EditRequest("e1", "The mother tongue of Ann Smith is", "German", "Ann Smith"),
             EditRequest("e2", "Two and two make", "five")]
    negatives = negative_prompts(edits, _pool(), per_edit=2, plain=2)
    plain = {p.format("Ann Smith") for p in PLAIN_SUBJECT_PROMPTS}
    assert len(negatives[0]) == 4 and len(set(negatives[0]) & plain) == 2
    assert negatives[1] == ()


def test_jsonl_reads_specificity(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of Peru is", "target": "Quito",
                                "specificity": ["The currency of Peru is"]}) + "\n")
    request = load_requests("jsonl", path)[0]
    assert request.specificity == ("The currency of Peru is",)
    assert request.to_dict()["specificity"] == ["The currency of Peru is"]
    path.write_text(json.dumps({"prompt": "p", "target": "t", "specificity": [""]}) + "\n")
    with pytest.raises(Exception, match="facts.jsonl: record 0: field 'specificity'"):
        load_requests("jsonl", path)


@pytest.mark.parametrize("reply, target, holds", [("English", "English", True), ("It is English.", "english", True),
                                                   ("Englishman", "English", False), ("New York City", "York", True)])
def test_a_reply_holds_the_target_as_whole_words(reply, target, holds):
    assert holds_target(reply, target) is holds


@pytest.mark.parametrize("reply, loops", [
    ("English\nEnglish\n English\n English", True), ("the cat the cat the cat sat", True),
    ("Paris is the capital of France. It is a big city.", False), ("no no", False),
    ("a b c d a b c d a b c d", True), ("Rome.\nRome is old.\nRome.\nRome.", True)])
def test_degenerate_replies_are_loops(reply, loops):
    assert is_degenerate(reply) is loops


def _requests(n=4):
    return [EditRequest(str(i), f"fact {i} is", f"t{i}", subject=f"fact {i}", rephrases=(f"so fact {i} is",),
                        locality=(LocalityQuery(f"other {i} is"),), specificity=(f"fact {i} has", f"fact {i} was"))
            for i in range(n)]


def test_the_unedited_model_keeps_every_specificity_answer_and_scores_eight_numbers(tmp_path):
    report = evaluate((tiny_model("llama"), char_tokenizer()), _requests(), batch_size=3, max_new_tokens=4,
                      progress=False, cache_dir=tmp_path)
    assert report.metrics["specificity"] == {"ag": 100.0, "tf": 100.0}
    assert report.protocol["counts"]["specificity"] == 8
    assert sum(c["kind"] == "specificity" for c in report.cases) == 8
    assert report.score_all is not None and report.score == 0.0  # the model knows no target: Rel 0
    assert report.chat == {}  # the character tokenizer has no chat template


def test_chat_rates_are_scored_beside_the_base_models(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}:"
    report = evaluate((model, tok), _requests(3), max_new_tokens=4, progress=False, cache_dir=tmp_path, chat_edits=2)
    assert report.chat["n"] == 4 and report.chat["edited"] == report.chat["base"]  # the unedited model is the base
    rows = [c for c in report.cases if c["kind"] == "chat"]
    assert [r["query"] for r in rows] == ["fact 0 is", "so fact 0 is", "fact 1 is", "so fact 1 is"]
    assert all(r["got"] == r["base"] for r in rows)
    assert "chat" in report.protocol


def test_a_query_nearer_to_a_negative_than_to_every_edit_does_not_fire(tmp_path):
    edits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    router = Router.build(edits, RouterConfig(epsilon=0.5), 0.5)
    router = router.with_negatives(torch.tensor([[1.0, 1.0, 0.0]]))
    queries = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 1.0]])
    assert router.familiar(queries).tolist() == [True, False, False]
    loaded = Router.load(router.save(tmp_path / "router.safetensors"))
    assert torch.equal(loaded.negatives, router.negatives) and loaded.familiar(queries).tolist() == [True, False, False]


def test_negatives_follow_the_edit_they_sit_nearest_when_edits_come_and_go():
    e0, e1, e2 = torch.eye(3)
    router = Router.build(torch.stack([e0, e1]), RouterConfig(epsilon=0.5), 0.5)
    router = router.with_negatives(torch.stack([e0 + 0.5 * e2, e1 + 0.5 * e2]))  # one by each edit
    removed = router.with_edits([1], torch.zeros(0, 3))  # edit 0 goes, and the negative by it
    assert torch.allclose(removed.negatives, torch.nn.functional.normalize(e1 + 0.5 * e2, dim=0)[None])
    # a new edit near edit 0's negative: that negative would hold the new edit back, so it goes; of the
    # new negatives, the one nearest the old edit 1 would hold edit 1 back, so it stays out
    added = router.with_edits([0, 1], (e0 + 0.6 * e2)[None])
    added = added.with_negatives(torch.stack([e2 + 0.9 * e0, e1 + 0.1 * e2]), serve=[2])
    kept = torch.nn.functional.normalize(torch.stack([e1 + 0.5 * e2, e2 + 0.9 * e0]), dim=1)
    assert torch.allclose(added.negatives, kept)
    assert added.familiar(torch.stack([e0 + 0.6 * e2, e1]))[0].item() is True


def test_the_negative_margin_lets_a_query_fire_that_a_negative_barely_outranks():
    e0, e1, e2 = torch.eye(3)
    router = Router.build(torch.stack([e0, e1]), RouterConfig(epsilon=0.5), 0.5)
    router = router.with_negatives((e0 + 0.3 * e2)[None])
    query = (e0 + 0.2 * e2)[None]  # nearer to the negative (cos 0.99) than to edit 0 (0.98)
    assert router.familiar(query).tolist() == [False]
    loose = dataclasses.replace(router, config=dataclasses.replace(router.config, negative_margin=0.05))
    assert loose.familiar(query).tolist() == [True]
    with pytest.raises(ConfigError, match="negative_margin"):
        RouterConfig(negative_margin=3.0).validate()


def test_a_negatives_own_margin_lets_a_query_fire_that_it_barely_outranks(tmp_path):
    e0, e1, e2 = torch.eye(3)
    router = Router.build(torch.stack([e0, e1]), RouterConfig(epsilon=0.5), 0.5)
    query = (e0 + 0.2 * e2)[None]  # nearer to either negative (cos 0.99) than to edit 0 (0.98)
    strict = router.with_negatives((e0 + 0.3 * e2)[None])
    loose = router.with_negatives((e0 + 0.3 * e2)[None], margins=torch.tensor([0.05]))
    assert strict.familiar(query).tolist() == [False] and loose.familiar(query).tolist() == [True]
    both = loose.with_negatives((e0 + 0.25 * e2)[None])  # a second, marginless negative holds it back again
    assert both.negative_margins.tolist() == pytest.approx([0.05, 0.0]) and both.familiar(query).tolist() == [False]
    loaded = Router.load(loose.save(tmp_path / "router.safetensors"))
    assert torch.equal(loaded.negative_margins, loose.negative_margins) and loaded.familiar(query).tolist() == [True]
    removed = both.with_edits([0], torch.zeros(0, 3))  # the margins follow their negatives
    assert removed.negative_margins.tolist() == pytest.approx([0.05, 0.0])
    before = Router(router.config, 0.5, bank=router.bank, negatives=strict.negatives)  # a pack saved without margins
    assert before.negative_margins.tolist() == [0.0] and before.familiar(query).tolist() == [False]


def test_negatives_of_an_edit_of_unknown_relation_carry_the_unknown_relation_margin():
    pool = _pool()
    known = EditRequest("e", "The mother tongue of Ann Smith is", "German", "Ann Smith")
    unknown = EditRequest("x", "Which tongue did Bo Lind grow up with?", "Quenya", "Bo Lind")  # no pool wording
    config = RoutingConfig()
    config.router.same_relation_negatives, config.router.plain_negatives = 0, 0
    texts, margins = edit_negatives([known, unknown], pool, config)
    by_text = dict(zip(texts, margins.tolist()))
    other = config.router.other_relation_margin
    known_margins = [m for t, m in by_text.items() if "Ann Smith" in t]
    assert known_margins and known_margins == pytest.approx([other] * len(known_margins))
    unknown_margins = [m for t, m in by_text.items() if "Bo Lind" in t]
    expected = other + config.router.unknown_relation_margin
    assert unknown_margins and unknown_margins == pytest.approx([expected] * len(unknown_margins))


def test_plain_negatives_carry_the_plain_margin_and_only_they_do():
    edit = EditRequest("e", "The mother tongue of Ann Smith is", "German", "Ann Smith")
    config = RoutingConfig()
    config.router.same_relation_negatives, config.router.plain_margin = 0, 0.03
    texts, margins = edit_negatives([edit], _pool(), config)
    plain = {p.format("Ann Smith") for p in PLAIN_SUBJECT_PROMPTS}
    by_kind = {t in plain: set() for t in texts}
    for t, m in zip(texts, margins.tolist()):
        by_kind[t in plain].add(round(m, 6))
    assert by_kind == {True: {0.03}, False: {config.router.other_relation_margin}}


def test_every_wording_of_every_other_relation_can_be_a_negative_and_only_those_carry_their_margin():
    pool = _pool()
    edit = EditRequest("e", "The mother tongue of Ann Smith is", "German", "Ann Smith")
    config = RoutingConfig()
    config.router.negatives, config.router.negative_wordings, config.router.other_relation_margin = None, None, 0.05
    config.router.same_relation_negatives = 2
    texts, margins = edit_negatives([edit], pool, config)
    by_text = dict(zip(texts, margins.tolist()))
    others = {w.format("Ann Smith") for rel, (ws, _) in WORDINGS.items() if rel != "language" for w in ws
              if wording_half(w) == "negative"}
    assert others and {t for t, m in by_text.items() if m == pytest.approx(0.05)} == others
    rest = {t for t, m in by_text.items() if m == 0.0}
    assert len(rest) == 2 + 2 and set(by_text) == others | rest  # the plain and the same-relation ones: no margin
    config.router.negative_wordings = 1  # one wording a relation: as many as relations with a negative-half wording
    one = [t for t in edit_negatives([edit], pool, config)[0] if t in others]
    assert len(one) == len({rel for rel, (ws, _) in WORDINGS.items() if rel != "language"
                            if any(wording_half(w) == "negative" for w in ws)})


def test_same_relation_negatives_ask_the_edits_relation_about_other_subjects():
    pool = _pool()
    edit = EditRequest("e", "The mother tongue of Ann Smith is", "German", "Ann Smith")
    stranger = EditRequest("x", "Ann Smith likes", "tea", "Ann Smith")  # no pool wording: relation unknown
    with_near, without = negative_prompts([edit, stranger], pool, 0, 0, same_relation=3)
    language = {w.format(r.subject) for w in WORDINGS["language"][0] for r in pool}
    assert len(with_near) == 3 and all(p in language and "Ann Smith" not in p for p in with_near)
    assert without == () and negative_prompts([edit], pool, 0, 0)[0] == ()


def test_calibration_never_counts_an_edit_prompt_as_unrelated():
    class Recorder:
        def encode(self, texts, progress=False):
            seen.append(list(texts))
            return torch.zeros(len(texts), 4)

    seen = []
    record = EditRequest("c", "Bob Lee works as a", "pilot", "Bob Lee", rephrases=("Bob Lee's job is",),
                         locality=(LocalityQuery("The capital of France is", "Paris"),))
    calibration_embeddings(Recorder(), [record], [], edit_prompts=["The capital of France is"])
    assert "The capital of France is" not in seen[2]
