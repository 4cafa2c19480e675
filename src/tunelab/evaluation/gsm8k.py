"""GSM8K: accuracy of the final number and compliance with the "#### N" answer format.

Zero-shot, the prompt is the bare question as the user message: no instruction about the format, so a before/after
comparison shows what fine-tuning taught the model (GSM8K's "#### N" ending) rather than what the prompt asked for.
k-shot puts k solved training problems before the question as earlier chat turns, which is how a chat model sees
examples; their answers are cleaned the way the data layer cleans training data (calculator annotations removed).
"""

from __future__ import annotations

from tunelab.data.formats import FORMATS, final_number
from tunelab.data.sources import Row, read_source
from tunelab.errors import UserError
from tunelab.evaluation.extract import extract_answer, has_format, normalize_number, numbers_equal

DEFAULT_SHOTS = "bundled:gsm8k/train"


def _question_gold(row) -> tuple[str, str | None]:
    """(question, gold number) from a raw GSM8K row, a data-layer Row, or a normalized record {messages, answer}."""
    if isinstance(row, Row):
        row = row.data
    if "question" in row:
        answer = row.get("answer")
        gold = final_number(answer) if isinstance(answer, str) and "####" in answer else answer
        return row["question"], normalize_number(gold)
    if "messages" in row:
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        if users:
            return users[-1], normalize_number(row.get("answer"))
    raise UserError("a GSM8K row needs 'question' and 'answer' fields (GSM8K's own format)")


def read_questions(spec: str, n: int | None = None, key: str = "--data") -> list[dict]:
    """The first `n` rows of `spec` (all when n is None), checked before any model loads: each needs a question and
    a gold number, without which every answer would score as wrong. `key` names the setting in a refusal."""
    try:
        rows = read_source(spec)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    if not rows:
        raise UserError(f"{key} {spec}: no rows to evaluate")
    rows = rows[:n] if n else rows
    for row in rows:
        try:
            _, gold = _question_gold(row.data)
        except UserError:
            raise UserError(f"{row.origin}: {key} needs GSM8K rows (question, answer ending in '#### N'), not "
                            f"{', '.join(sorted(row.data)) or 'an empty row'}") from None
        if gold is None:
            raise UserError(f"{row.origin}: {key} row has no gold number (GSM8K's answer ends in '#### N')")
    return [r.data for r in rows]


def shot_turns(shots: list) -> list[dict]:
    """Solved examples as alternating user/assistant messages."""
    turns: list[dict] = []
    for i, s in enumerate(shots):
        data = s.data if isinstance(s, Row) else s
        if "messages" in data:
            turns += [m for m in data["messages"] if m["role"] != "system"]
        else:
            turns += FORMATS["qa"].normalize(Row(data, f"shot {i}"))["messages"]
    return turns


def conversations(rows: list, k_shot: int = 0, shots: list | None = None) -> list[list[dict]]:
    """The chat conversation each question is asked in (for display in reports, too)."""
    if k_shot and shots is None:
        shots = [r.data for r in read_source(DEFAULT_SHOTS)]
    prefix = shot_turns((shots or [])[:k_shot]) if k_shot else []
    if k_shot and len(prefix) < 2 * k_shot:
        raise UserError(f"--k-shot {k_shot} asks for more solved examples than the {len(prefix) // 2} given")
    return [prefix + [{"role": "user", "content": _question_gold(r)[0]}] for r in rows]


def score(outputs: list[str], golds: list[str | None]) -> dict:
    """Accuracy and format rate of outputs against gold numbers (no model needed: used by tests and rewards alike)."""
    n = len(outputs)
    preds = [extract_answer(o) for o in outputs]
    correct = [numbers_equal(p, g) for p, g in zip(preds, golds)]
    formatted = [has_format(o) for o in outputs]
    return {"n": n, "accuracy": sum(correct) / n if n else 0.0, "format_rate": sum(formatted) / n if n else 0.0,
            "preds": preds, "correct": correct, "formatted": formatted}


def evaluate(model, tok, rows: list, *, k_shot: int = 0, shots: list | None = None, batch_size: int = 16,
             max_new_tokens: int = 256, params=None, show_progress: bool = True) -> dict:
    """Generate an answer for each GSM8K row and score it.

    rows: dicts with `question` and `answer` (GSM8K's raw format; normalized {messages, answer} records work too).
    shots: solved examples for k-shot (default: the bundled training sample, never the test questions).
    params: a `GenParams` (sampling); default greedy with `max_new_tokens`.
    show_progress: progress per batch (common.progress); off inside training, which shows its own.
    Returns {"n", "accuracy", "format_rate", "examples": [{question, gold, output, pred, correct, formatted}]}.
    """
    from tunelab.evaluation.common import chat_with_progress
    from tunelab.inference.engine import GenParams

    if not rows:
        raise UserError("GSM8K evaluation got no questions")
    params = params or GenParams(max_new_tokens=max_new_tokens)
    qg = [_question_gold(r) for r in rows]
    convs = conversations(rows, k_shot, shots)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        outputs = chat_with_progress(model, tok, convs, params, batch_size, "gsm8k", show_progress)
    finally:
        if was_training:
            model.train()
    s = score(outputs, [g for _, g in qg])
    examples = [{"question": q, "gold": g, "output": o, "pred": p, "correct": c, "formatted": f}
                for (q, g), o, p, c, f in zip(qg, outputs, s["preds"], s["correct"], s["formatted"])]
    return {"n": s["n"], "accuracy": s["accuracy"], "format_rate": s["format_rate"], "examples": examples}
