import math

import pytest

from megedit.eval.metrics import ag_match, could_still_match, harmonic_mean, normalize_answer, percent, tf_accuracy


def test_ag_normalises_case_space_and_trailing_dots_but_nothing_else():
    assert ag_match(" english.", "English")
    assert ag_match("English...", "English")
    assert ag_match("U.S.", "U.S")
    assert ag_match("New York\nand more", "new york")  # AG stops at the newline
    assert not ag_match("English language", "English")
    assert not ag_match("Englis", "English")
    assert normalize_answer("  Paris . ") == "paris"


def test_tf_gives_partial_credit_per_token():
    assert tf_accuracy([5, 6, 7], [5, 6, 7]) == 1.0
    assert tf_accuracy([5, 0, 7, 0], [5, 6, 7, 8]) == 0.5
    assert tf_accuracy([0], [4]) == 0.0
    with pytest.raises(ValueError):
        tf_accuracy([1, 2], [1])


def test_harmonic_mean_is_sunk_by_a_zero():
    assert math.isclose(harmonic_mean([100, 100, 100, 100, 100, 100]), 100)
    assert math.isclose(harmonic_mean([50, 100]), 200 / 3)
    assert harmonic_mean([100, 0, 90]) == 0.0


def test_percent_of_bools_and_fractions():
    assert percent([True, False, True, True]) == 75.0
    assert percent([0.5, 1.0]) == 75.0


@pytest.mark.parametrize("partial, target, open_", [
    ("", "English", True), (" Eng", "English", True), (" English", "English", True),
    (" English.", "English", True), (" English ..", "English", True), (" English l", "English", False),
    (" French", "English", False), (" new ", "New York", True), (" U.S", "U.S.", True),
    (" Z\ufffd", "Zürich", True), (" English\n", "English", True), (" Eng\n", "English", False),
])
def test_could_still_match_agrees_with_ag_match(partial, target, open_):
    assert could_still_match(partial, target) is open_
    if not open_:  # once closed, no continuation matches
        for tail in ("", "lish", ".", "\n"):
            assert not ag_match(partial + tail, target)
