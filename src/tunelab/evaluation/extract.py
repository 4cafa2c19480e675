"""Final-answer extraction for math word problems, shared by GSM8K evaluation and the GRPO/PPO rewards.

Evaluation and rewards must agree on what "the model's answer" is, or a reward would train towards a format the
evaluation does not score. Order of preference: the last "#### N" (GSM8K's own format), then the last `\\boxed{N}`
(what math-tuned models write), then an `<answer>N</answer>` tag (the GRPO reasoning format), then the last number
anywhere. Numbers are normalized so that "$1,234.00", "1234 dollars" and "1234" compare equal.

All patterns are linear (no nested quantifiers), so adversarial or very long model output cannot make them backtrack
catastrophically.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number as people and models write it: optional sign, optional currency sign, thousands separators (only in groups
# of three, so a list "3,4,5" is not read as 345), optional decimals. A bare ".5" counts too.
# A minus sign counts only where it cannot be subtraction (not right after a digit or bracket): "10 - 2" ends in 2.
_NUM = (r"(?:(?<![\d)\]])(?<![\d)\]]\s)[-−]\s?)?[$€£¥₹]?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
        r"|(?<![\w.])[-−]?\.\d+")
_NUM_RE = re.compile(_NUM)
_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}")
_SLASH_FRAC_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(\d+)\s*$")

HASH_FORMAT_RE = re.compile(r"####\s*(?:" + _NUM + r")")


def normalize_number(s: str | int | float | None) -> str | None:
    """Canonical text of a number: no sign of currency, no thousands separators, no trailing zeros ("18.00" -> "18").

    Returns None when `s` is not a number.
    """
    if s is None:
        return None
    if isinstance(s, bool):
        return None
    text = str(s).strip()
    text = text.replace("−", "-").replace(",", "")
    text = re.sub(r"[$€£¥₹\s]", "", text)
    text = text.rstrip("%.")  # "50%" -> "50"; a sentence's full stop "18." -> "18"
    if text.startswith("+"):
        text = text[1:]
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    # A number with more than 50 integer digits is not an answer but noise (or an attack on int conversion).
    if not d.is_finite() or d.adjusted() > 50:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUM_RE.finditer(text):
        last = m.group(0)
    return normalize_number(last) if last is not None else None


def _first_number(text: str) -> str | None:
    m = _NUM_RE.search(text)
    return normalize_number(m.group(0)) if m else None


def _fraction(text: str) -> str | None:
    m = _FRAC_RE.search(text) or _SLASH_FRAC_RE.match(text)
    if not m:
        return None
    num, den = int(m.group(1)), int(m.group(2))
    if den == 0:
        return None
    return normalize_number(str(Decimal(num) / Decimal(den)))


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (and `\\fbox{...}`), with nested braces balanced.

    One pass over the braces with a stack, so thousands of unclosed boxes cost linear time, not quadratic.
    """
    starts = {m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)}
    if not starts:
        return []
    found, stack = [], []
    for m in re.finditer(r"[{}]", text):
        if m.group(0) == "{":
            stack.append(m.end())
        elif stack:
            begin = stack.pop()
            if begin in starts:
                found.append((begin, m.start()))
    return [text[b:e] for b, e in sorted(found)]


def answer_tag_contents(text: str) -> list[str]:
    """Contents of every `<answer>...</answer>`, found from the closing tags (linear even with no closing tag)."""
    low, out, pos = text.lower(), [], 0
    while (close := low.find("</answer>", pos)) != -1:
        open_ = low.rfind("<answer>", pos, close)
        if open_ != -1:
            out.append(text[open_ + len("<answer>"): close])
        pos = close + len("</answer>")
    return out


def _number_in(fragment: str) -> str | None:
    """The number a final-answer fragment states: a fraction as a whole, else its first number."""
    frac = _fraction(fragment)
    if frac is not None:
        return frac
    # LaTeX noise inside boxes: \$ 18, 18\text{ dollars}, 1{,}000
    cleaned = fragment.replace("\\$", "$").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    return _first_number(cleaned)


def extract_answer(text) -> str | None:
    """The final numeric answer of a model's output, normalized, or None when there is none."""
    if isinstance(text, list):  # a chat completion: the text of its messages
        text = "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in text)
    if not isinstance(text, str) or not text:
        return None
    for part in reversed(text.split("####")[1:]):  # each '####' up to the end of its line (or the next '####')
        n = _number_in(part.split("\n", 1)[0])
        if n is not None:
            return n
    for content in reversed(boxed_contents(text)):
        n = _number_in(content)
        if n is not None:
            return n
    for content in reversed(answer_tag_contents(text)):
        n = _number_in(content)
        if n is not None:
            return n
    return _last_number(text)


def has_format(text) -> bool:
    """True when the output states its answer GSM8K-style: '#### N'."""
    return isinstance(text, str) and HASH_FORMAT_RE.search(text) is not None


def numbers_equal(a, b, rel_tol: float = 1e-9) -> bool:
    """Whether two answers (strings or numbers, in any spelling `normalize_number` accepts) are the same number."""
    na, nb = normalize_number(a), normalize_number(b)
    if na is None or nb is None:
        return False
    if na == nb:
        return True
    da, db = Decimal(na), Decimal(nb)
    return abs(da - db) <= Decimal(str(rel_tol)) * max(abs(da), abs(db))
