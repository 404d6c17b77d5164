"""GSM8K answer extraction: our numeric rule and lm-evaluation-harness's strict and flexible rules, on edge cases."""

import pytest

from spin_ray.data.gsm8k import (
    final_answer,
    harness_flexible,
    harness_match,
    harness_strict,
    has_answer_format,
    normalise_number,
)

HUMAN = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1,200", "1200"), ("$18.00", "18"), ("-3", "-3"), ("0.50", "0.5"), ("100", "100"), ("7.", "7"), ("abc", None),
     ("1" * 60, "1" * 60), ("9" * 40 + ".5", "9" * 40 + ".5")],  # a random model's digit runs: exact, no crash
)
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


def test_final_answer_takes_the_number_after_the_last_marker():
    human = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert final_answer(human) == "18"
    assert final_answer("#### 5\nwait, no\n#### $1,000.00 dollars") == "1000"


def test_final_answer_without_marker_takes_the_last_number():
    assert final_answer("First 3 apples, then 4 more, so the answer is 7.") == "7"
    assert final_answer("no numbers here") is None
    assert final_answer(None) is None


@pytest.mark.parametrize(
    ("answer", "extracted", "matches_72"),
    [
        ("So she sold 72.\n#### 72", "72", True),
        ("#### 72.", "72.", True),  # the trailing period is dropped before comparing
        ("#### 7,2", "7,2", True),  # commas are dropped on both sides
        ("#### $72", "[invalid]", False),  # strict wants a digit, '-' or '.' right after '#### '
        ("#### 72.0", "72.0", False),  # compared as strings: 72.0 is not 72
        ("#### 12\nno wait\n#### 72", "12", False),  # the FIRST '#### <number>'
        ("####72", "[invalid]", False),  # the space after the marker is required
        ("The answer is 72", "[invalid]", False),
        ("#### -3.5", "-3.5", False),
    ],
)
def test_lm_eval_strict_match(answer, extracted, matches_72):
    assert harness_strict(answer) == extracted
    assert harness_match(extracted, HUMAN) is matches_72


@pytest.mark.parametrize(
    ("answer", "extracted", "matches_72"),
    [
        ("She sold 48 then 24, 72 in all.", "72", True),  # the last number
        ("Total: $72.", "$72.", True),  # '$' and the trailing '.' are dropped
        ("1,000 clips? No: 72", "72", True),
        ("72 clips, then 5", "5", False),
        ("#### 72\nthat is 72.00", "72.00", False),  # the last one, compared as a string
        ("no number", "[invalid]", False),
        ("a single digit 7", "7", False),  # one digit takes the second alternative
        ("lost -3 dollars", "-3", False),
    ],
)
def test_lm_eval_flexible_extract(answer, extracted, matches_72):
    assert harness_flexible(answer) == extracted
    assert harness_match(extracted, HUMAN) is matches_72


def test_lm_eval_target_is_what_follows_the_last_marker_of_the_human_answer():
    assert harness_match("1000", "He pays $1,000 in all.\n#### 1,000")
    assert harness_match("-3.5", "#### 2\nsorry:\n#### -3.5")
    assert not harness_match("2", "#### 2\nsorry:\n#### -3.5")


@pytest.mark.parametrize(
    ("answer", "formatted"),
    [("so 18\n#### 18", True), ("#### $1,000", True), ("#### -0.5.", True), ("#### 18\nthanks", False),
     ("the answer is 18", False), ("####", False), ("", False)],
)
def test_answer_format_is_a_last_line_with_the_marker_and_a_number(answer, formatted):
    assert has_answer_format(answer) is formatted
