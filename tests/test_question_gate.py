"""The question gate (stages/question_gate.py): a query naming an edit's subject fires only when it asks
the edit's own question; the subjects it needs travel in the edit table."""

import json

import pytest
import torch
from test_add import EDITS, encoder, load, setup  # noqa: F401 (fixtures)

from megedit.edit_table import EditTable
from megedit.stages.question_gate import QuestionGate, question_of


class WordsEncoder:
    """Bag-of-words embeddings (normalised), counting its calls: questions that share words are near."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def encode(self, texts, progress=False):
        self.calls += 1
        out = torch.zeros(len(texts), 64)
        for row, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                out[row, self.vocab.setdefault(word, len(self.vocab) % 64)] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


def test_the_question_is_the_sentence_naming_the_subject_with_the_subject_masked():
    assert question_of("The Eiffel Tower was built in the year", "Eiffel Tower") == "it was built in the year"
    assert question_of("Noise first. Then: where is the eiffel tower?", "Eiffel Tower") == "Then: where is it?"
    assert question_of("Theme of Paris", "Paris") == "Theme of it"  # an article only as a word of its own
    assert question_of("A line\nParis is the capital of", "Paris") == "it is the capital of"
    assert question_of("Where is Rome?", "Paris") is None
    assert question_of("Where is Rome?", None) is None and question_of("Where is Rome?", "") is None


def test_the_gate_passes_the_edits_own_question_and_holds_back_another_about_its_subject():
    words = WordsEncoder()
    gate = QuestionGate(words, ["Eiffel Tower", None], ["The Eiffel Tower is located in the city of", "Kp7:"],
                        [("The Eiffel Tower stands in the city of",), ()], threshold=0.7)
    texts = ["The Eiffel Tower can be found in the city of", "The Eiffel Tower was built in the year",
             "The tower by the Seine was built in the year", "Kp7: was built in the year"]
    rows = [0, 0, 0, 1]
    similarity = gate.similarity(texts, rows)
    assert similarity[0] > 0.7 > similarity[1] and similarity[2:] == [None, None]  # not named; subject unknown
    assert gate.passes(texts, rows) == [True, False, True, True]
    calls = words.calls
    gate.passes(texts[:2], rows[:2])
    assert words.calls == calls + 1  # the edit's own questions were embedded once, then kept


def test_an_edit_with_its_prompt_alone_gets_the_lone_threshold_and_prefixed_prompts_add_nothing():
    gate = QuestionGate(WordsEncoder(), ["Rome", "Paris"], ["Rome lies in", "Paris is the capital of"],
                        [("Some words first. Rome lies in",), ("Paris is a city in",)], threshold=0.9,
                        lone_threshold=0.1)
    assert gate.questions == [("Rome lies in",), ("Paris is the capital of", "Paris is a city in")]
    texts = ["Rome was built in the year", "Paris was built in the year"]
    assert gate.passes(texts, [0, 1]) == [True, False]
    assert gate.threshold_of(0) == 0.1 and gate.threshold_of(1) == 0.9


def test_subjects_travel_in_the_edit_table_and_old_tables_load_without_them(tmp_path):
    table = EditTable.from_fit(EDITS[:2], [(), ("x",)], torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))
    assert table.subjects == [None, None]
    table.subjects = ["Kp7", None]
    table.save(tmp_path)
    loaded = EditTable.load(tmp_path)
    assert loaded.subjects == ["Kp7", None] and (loaded + loaded.select([0])).subjects == ["Kp7", None, "Kp7"]
    assert loaded.requests([0])[0].subject == "Kp7"
    record = json.loads((tmp_path / "edits.json").read_text())
    for edit in record["edits"]:
        edit.pop("subject", None)
    (tmp_path / "edits.json").write_text(json.dumps(record))
    assert EditTable.load(tmp_path).subjects == [None, None]


def test_a_query_the_gate_holds_back_runs_on_the_base_model(setup, load):  # noqa: F811
    edited = load(setup[3])
    assert edited.gate is None  # the tiny edits name no subject
    prompt = EDITS[0].prompt
    assert bool(edited.route([prompt])[2][0])
    edited.edits.subjects[0] = prompt[:3]
    edited.gate = QuestionGate(WordsEncoder(), edited.edits.subjects, edited.edits.prompts, edited.edits.wordings,
                               threshold=0.9)
    asked_again, asked_else = prompt, f"{prompt[:3]} is a word of"
    _, _, familiar = edited.route([asked_again, asked_else])
    assert familiar.tolist() == [True, False]
    with edited.unedited():
        base = edited.generate([asked_else], max_new_tokens=4)
    assert edited.generate([asked_else], max_new_tokens=4) == base


@pytest.mark.parametrize("threshold", [None, 0.4])
def test_a_fitted_pack_gates_by_its_router_setting(setup, load, threshold):  # noqa: F811
    import dataclasses

    edited = load(setup[3])
    edited.edits.subjects[0] = "Kp7"
    edited.router = dataclasses.replace(edited.router, config=dataclasses.replace(
        edited.router.config, question_gate=threshold, question_gate_lone=0.2))
    from megedit.edited import _question_gate

    gate = _question_gate(edited.encoder, edited.router, edited.edits)
    assert (gate is None) == (threshold is None)
    assert gate is None or (gate.threshold, gate.lone_threshold, gate.subjects[0]) == (threshold, 0.2, "Kp7")


def test_generate_names_the_threshold_that_held_a_query_back(setup, load):  # noqa: F811
    import dataclasses

    from megedit.cli.meg import _router_lines

    edited = load(setup[3])
    edited.router = dataclasses.replace(edited.router, epsilon=2.0)  # every query near: the gate decides
    prompt = EDITS[0].prompt
    edited.edits.subjects[0] = prompt[:3]
    edited.gate = QuestionGate(WordsEncoder(), edited.edits.subjects, edited.edits.prompts,
                               [() for _ in edited.edits.prompts], threshold=0.99, lone_threshold=0.95)
    asked_else = f"{prompt[:3]} is a word of"
    if edited.router.nearest_edit(edited.encoder.encode([asked_else]))[0] != 0:
        pytest.skip("the tiny encoder puts the query nearest another edit")
    line, asked = _router_lines(edited, [asked_else, prompt])
    assert line.startswith("off") and "< 0.95)" in line  # the edit has its prompt alone: the lone threshold
    assert asked.startswith("edit") and asked.endswith("question cosine 1.00 >= 0.95)")  # its own question passes
