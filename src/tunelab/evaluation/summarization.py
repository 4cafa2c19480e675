"""Summarization: generate a summary per sample and score it against the reference with ROUGE-1/2/L (F1).

ROUGE comes from Google's `rouge-score` package (the implementation behind most published numbers), with its Porter
stemmer on, as is usual for summarization papers. Samples are read through the data layer, so a DialogSum file gets the
same "Summarize the following dialogue." prompt the model was trained with; any conversation file works too, its last
assistant reply being the reference.

Several references per sample (DialogSum's test split has three: `summary1..3`; any file can carry a `references`
list) are scored the usual way, each metric against the best-matching reference of the sample (`rougeL_best_ref`),
and also as the mean over the sample's references (`rougeL_mean_ref`): the report names both.
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


def rouge_multi(predictions: list[str], references: list[list[str]]) -> list[dict]:
    """Per-sample ROUGE F1 against several references: {"<type>_best_ref": best over the sample's references,
    "<type>_mean_ref": their mean} for each ROUGE type. The best is taken per type, as is usual (the best ROUGE-1
    and the best ROUGE-L of a sample may come from different references)."""
    flat_pred = [p for p, refs in zip(predictions, references) for _ in refs]
    flat = rouge_pairs(flat_pred, [r for refs in references for r in refs])
    out, i = [], 0
    for refs in references:
        scores, i = flat[i: i + len(refs)], i + len(refs)
        out.append({**{f"{k}_best_ref": max(s[k] for s in scores) for k in ROUGE_TYPES},
                    **{f"{k}_mean_ref": sum(s[k] for s in scores) / len(scores) for k in ROUGE_TYPES}})
    return out


# the metrics of a result scored against several references, in report order (all higher-is-better)
MULTI_REF_METRICS = [(f"{k}_{how}_ref", True) for how in ("best", "mean") for k in ROUGE_TYPES]


def evaluate(model, tok, records: list[dict], *, batch_size: int = 8, max_new_tokens: int = 128, params=None,
             show_progress: bool = True) -> dict:
    """Summaries for normalized records ({messages} with the reference as the last assistant turn; several
    references in "references").

    Returns {"n", "rouge1", "rouge2", "rougeL", "examples": [{prompt, reference, output, rouge1, rouge2, rougeL}]};
    when any sample has several references, the metrics are `<type>_best_ref` and `<type>_mean_ref` instead (see
    `rouge_multi`), "metrics" names them for the report and each example carries its "references".
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
        refs.append(rec.get("references") or [ref])
    if not prompts:
        raise UserError("summarization got no samples")
    params = params or GenParams(max_new_tokens=max_new_tokens)
    outputs = chat_with_progress(model, tok, prompts, params, batch_size, "summarization", show_progress)
    n = len(outputs)
    if all(len(r) == 1 for r in refs):
        pairs = rouge_pairs(outputs, [r[0] for r in refs])
        examples = [{"prompt": prompt_text(p), "reference": r[0], "output": o, **s}
                    for p, r, o, s in zip(prompts, refs, outputs, pairs)]
        return {"n": n, **{k: sum(s[k] for s in pairs) / n for k in ROUGE_TYPES}, "examples": examples}
    scores = rouge_multi(outputs, refs)
    examples = [{"prompt": prompt_text(p), "reference": "\n---\n".join(r), "references": r, "output": o, **s}
                for p, r, o, s in zip(prompts, refs, outputs, scores)]
    return {"n": n, **{k: sum(s[k] for s in scores) / n for k, _ in MULTI_REF_METRICS},
            "references": max(len(r) for r in refs), "metrics": MULTI_REF_METRICS, "examples": examples}
