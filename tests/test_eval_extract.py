"""Answer extraction shared by GSM8K evaluation and the rewards: many spellings, adversarial strings."""

import time

import pytest

from tunelab.evaluation.extract import extract_answer, has_format, normalize_number, numbers_equal
from tunelab.evaluation.gsm8k import score


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $1,234.00", "1234"),
    ("#### 18.00", "18"),
    ("#### 18.50", "18.5"),
    ("#### 18 dollars", "18"),
    ("####18", "18"),
    ("#### -7", "-7"),
    ("first #### 3\nthen corrected #### 4", "4"),
    ("#### \n the answer is 12", "12"),  # empty '####' falls back to the last number
    ("The answer is \\boxed{72}.", "72"),
    ("\\boxed{\\$1{,}000}", "1000"),
    ("\\boxed{\\frac{1}{4}}", "0.25"),
    ("\\boxed{18\\text{ dollars}} and then 99", "18"),
    ("\\boxed{\\text{{42}}}", "42"),
    ("<reasoning>2+2</reasoning><answer> 4 </answer>", "4"),
    ("So she earns $1,080 per week.", "1080"),
    ("The total is 5 + 3 = 8 apples.", "8"),
    ("10 - 2", "2"),  # subtraction, not a negative answer
    ("It drops to -3 degrees", "-3"),
    ("rate is 50%", "50"),
    ("The answer is 18.", "18"),
    ("It costs €12.5 in total", "12.5"),
    ("a list 3,4,5", "5"),
    ("half is .5", "0.5"),
    ("Unicode minus −4", "-4"),
    ("no number here", None),
    ("", None),
    (None, None),
    ("####", None),
    ([{"role": "assistant", "content": "#### 6"}], "6"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_has_format():
    assert has_format("blah\n#### 42")
    assert has_format("#### $1,000")
    assert not has_format("the answer is 42")
    assert not has_format("#### none")
    assert not has_format(None)


@pytest.mark.parametrize("a,b,eq", [
    ("18.00", "18", True), ("$1,000", "1000", True), (18, "18.0", True), ("0.5", ".5", True),
    ("18", "19", False), (None, "1", False), ("abc", "abc", False), ("1e999999", "1", False),
])
def test_numbers_equal(a, b, eq):
    assert numbers_equal(a, b) is eq


def test_normalize_rejects_non_numbers():
    assert normalize_number("nan") is None
    assert normalize_number("inf") is None
    assert normalize_number(True) is None
    assert normalize_number("-0.0") == "0"


def test_adversarial_inputs_are_fast():
    # Long runs of digits, separators and braces must not make the patterns backtrack for long.
    nasty = ["1," * 20000, "#" * 50000 + "1", "\\boxed{" * 5000, "-" * 50000 + "5", "9" * 100000 + ".",
             "<answer>" * 5000, "$ " * 30000]
    start = time.perf_counter()
    for s in nasty:
        extract_answer(s)
        has_format(s)
    assert time.perf_counter() - start < 3.0


def test_score_counts():
    s = score(["#### 4", "the answer is 5", "#### 7"], ["4", "5", "8"])
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["format_rate"] == pytest.approx(2 / 3)
