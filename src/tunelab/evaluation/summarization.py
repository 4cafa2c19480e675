"""Summarization: generate a summary per sample and score it against the reference with ROUGE-1/2/L (F1).

ROUGE comes from Google's `rouge-score` package (the implementation behind most published numbers), with its Porter
stemmer on, as is usual for summarization papers. Samples are read through the data layer, so a DialogSum file gets the
same "Summarize the following dialogue." prompt the model was trained with; any conversation file works too, its last
assistant reply being the reference.
"""

from __future__ import annotations

from tunelab.errors import UserError
from tunelab.evaluation.common import prompt_and_reference, prompt_text

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE needs the rouge-score package: pip install 'tunelab[eval]'") from None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_pairs(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-pair ROUGE F1 scores: [{"rouge1", "rouge2", "rougeL"}]."""
    scorer = _scorer()
    return [{k: float(s[k].fmeasure) for k in ROUGE_TYPES} for s in
            (scorer.score(ref, pred) for pred, ref in zip(predictions, references))]


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F1 over pairs (0..1)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    pairs = rouge_pairs(predictions, references)
    n = len(pairs)
    return {k: (sum(p[k] for p in pairs) / n if n else 0.0) for k in ROUGE_TYPES}


def evaluate(model, tok, records: list[dict], *, batch_size: int = 8, max_new_tokens: int = 128, params=None,
             show_progress: bool = True) -> dict:
    """Summaries for normalized records ({messages} with the reference as the last assistant turn).

    Returns {"n", "rouge1", "rouge2", "rougeL", "examples": [{prompt, reference, output, rouge1, rouge2, rougeL}]}.
    """
    from tunelab.evaluation.common import chat_with_progress
    from tunelab.inference.engine import GenParams

    prompts, refs = [], []
    for rec in records:
        p, ref = prompt_and_reference(rec)
        if ref is None:
            raise UserError("summarization needs a reference summary per sample (e.g. DialogSum's 'summary', or an "
                            "assistant reply in a conversation file)")
        prompts.append(p)
        refs.append(ref)
    if not prompts:
        raise UserError("summarization got no samples")
    params = params or GenParams(max_new_tokens=max_new_tokens)
    outputs = chat_with_progress(model, tok, prompts, params, batch_size, "summarization", show_progress)
    pairs = rouge_pairs(outputs, refs)
    examples = [{"prompt": prompt_text(p), "reference": r, "output": o, **s}
                for p, r, o, s in zip(prompts, refs, outputs, pairs)]
    n = len(examples)
    return {"n": n, **{k: sum(s[k] for s in pairs) / n for k in ROUGE_TYPES}, "examples": examples}
