"""A subject for an edit that names none: the prompt's longest run of capitalised words."""

import logging

import pytest

from megedit.data.requests import EditRequest
from megedit.data.specificity import with_specificity
from megedit.data.subjects import infer_subject, with_subjects


@pytest.mark.parametrize("prompt, subject", [
    ("The capital of Canada is", "Canada"),
    ("The Golden Gate Bridge is located in", "Golden Gate Bridge"),  # the sentence's opening "The" left out
    ("Who founded Google?", "Google"),
    ("In Japan, people pay with the", "Japan"),  # a comma ends a name
    ("The Statue of Liberty stands in the city of", "Statue of Liberty"),  # joiners inside a name
    ("Tell me about Bank of America.", "Bank of America"),
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux"),  # a possessive ends it
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("He was born in 1990 in", None),  # a pronoun, and a number alone, are no names
    ("the sky is", None),
])
def test_the_longest_run_of_capitalised_words_is_the_subject(prompt, subject):
    assert infer_subject(prompt) == subject
    assert subject is None or subject in prompt  # relation wordings and the gate find it verbatim


def test_a_given_subject_wins_and_the_inferred_ones_are_logged(caplog):
    given = EditRequest("a", "The capital of France is", "Rome", subject="capital of France")
    bare = EditRequest("b", "Google was founded by", "Steve Jobs")
    nameless = EditRequest("c", "the sky is", "green")
    with caplog.at_level(logging.INFO, logger="megedit"):
        out = with_subjects([given, bare, nameless], "facts.jsonl")
    assert [r.subject for r in out] == ["capital of France", "Google", None]
    assert out[1].prompt == bare.prompt and out[1].target == bare.target
    assert "facts.jsonl: subject taken from the prompt's capitalised words for 1 of 2 records" in caplog.text


def test_facts_without_a_subject_get_specificity_probes_about_the_one_inferred():
    pool = [EditRequest(f"p{i}", f"{city} is located in", country, subject=city, rephrases=(f"{city} lies in",))
            for i, (city, country) in enumerate([("Lyon", "France"), ("Osaka", "Japan"), ("Porto", "Portugal")])]
    pool += [EditRequest(f"q{i}", f"The football club of {city} is", club, subject=city)  # a probe-half wording
             for i, (city, club) in enumerate([("Lyon", "Olympique"), ("Osaka", "Gamba"), ("Porto", "FC Porto")])]
    fact = EditRequest("f", "Toulouse is located in", "Spain")
    probed = with_specificity([fact], pool, per_edit=3)[0]
    assert probed.subject == "Toulouse" and probed.specificity
    assert list(probed.specificity) == ["The football club of Toulouse is"]
