"""A file of prompts -> one generation per prompt, for reading side by side (one model here, several in `compare`).

Any file the data layer reads works: a .txt file (one prompt per line), prompt-only rows ({"prompt"}), or
conversations (the model answers the last user turn; the assistant reply in the file, if any, is shown as reference).
"""

from __future__ import annotations

from tunelab.evaluation.common import prompt_and_reference, prompt_text


def evaluate(model, tok, records: list[dict], *, batch_size: int = 8, max_new_tokens: int = 256, params=None,
             show_progress: bool = True) -> dict:
    """{"n", "examples": [{prompt, reference, output}]}."""
    from tunelab.evaluation.common import chat_with_progress
    from tunelab.inference.engine import GenParams

    pairs = [prompt_and_reference(r) for r in records]
    params = params or GenParams(max_new_tokens=max_new_tokens)
    outputs = chat_with_progress(model, tok, [p for p, _ in pairs], params, batch_size, "prompts", show_progress)
    examples = [{"prompt": prompt_text(p), "reference": ref, "output": o} for (p, ref), o in zip(pairs, outputs)]
    return {"n": len(examples), "examples": examples}
