"""What the evaluation tasks share: reading data through the data layer, and splitting a record into the prompt the
model is asked and the reference reply it is scored against."""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from tunelab.errors import UserError


def load_records(spec: str, fmt: str = "auto", n: int | None = None, columns: dict | None = None) -> list[dict]:
    """Normalized records of any source the data layer reads (same detection and prompts as training), first `n`;
    `columns` renames fields (yours -> expected), as data.columns does for training."""
    from tunelab.config import DataConfig
    from tunelab.data.build import load_records as _load

    records = _load(spec, DataConfig(train=spec, format=fmt, columns=columns or {}))
    if not records:
        raise UserError(f"{spec}: no rows to evaluate")
    return records[:n] if n else records


def prompt_and_reference(rec: dict) -> tuple[list[dict], str | None]:
    """(messages up to the last user turn, the assistant reply after it if any) of a normalized record."""
    if "messages" in rec:
        msgs = rec["messages"]
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
        if last_user is None:
            raise UserError("a record has no user message to prompt with")
        ref = next((m["content"] for m in msgs[last_user + 1:] if m["role"] == "assistant"), None)
        return msgs[: last_user + 1], ref
    if "prompt" in rec:
        return list(rec["prompt"]), rec.get("answer") if isinstance(rec.get("answer"), str) else None
    if "text" in rec:
        return [{"role": "user", "content": rec["text"]}], None
    raise UserError("records of this kind (preference/KTO pairs) have no single prompt and reference to evaluate; "
                    "use a conversation, prompt or text file")


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a report shows as 'the prompt'."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@contextlib.contextmanager
def progress(label: str, total: int, show: bool = True, console=None):
    """Yield `advance(n)`, to call as samples finish: a rich progress bar in a terminal; elsewhere (`> log`, CI, a
    notebook), where rich would draw the bar only once, at the end, one plain line per call with count and ETA."""
    from rich.console import Console

    console = console or Console()
    if not show:
        yield lambda n: None
    elif console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
    else:
        from tunelab.evaluation.report import format_duration

        t0, done = time.time(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            elapsed = time.time() - t0
            eta = format_duration(elapsed / done * (total - done)) if done else "?"
            print(f"{label}: {done}/{total}  elapsed {format_duration(elapsed)}  ETA {eta}", flush=True)

        yield advance


def chat_with_progress(model, tok, conversations: list[list[dict]], params, batch_size: int, label: str,
                       show: bool = True) -> list[str]:
    """inference.engine.chat, one batch at a time so progress can be shown between batches; same batches and same
    outputs as one call (engine.complete batches the longest prompts, in tokens, first: so does this; a seed is set
    once). Generation runs on `engine.evaluation_model` (a bf16 copy on CPUs with native bf16, unless
    params.precision is "model")."""
    from tunelab.inference.engine import chat_prompts, evaluation_model, generate

    prompts = chat_prompts(tok, conversations)
    lengths = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    gen_model = evaluation_model(model, params)
    try:
        with progress(label, len(prompts), show) as advance:
            for b in range(0, len(order), batch_size):
                idx = order[b: b + batch_size]
                # the engine seeds at every call: only the first, so sampling continues as in one call
                texts = generate(gen_model, tok, [prompts[i] for i in idx],
                                 params if b == 0 else replace(params, seed=None), batch_size)
                for i, t in zip(idx, texts):
                    outputs[i] = t
                advance(len(idx))
    finally:
        del gen_model  # a bf16 copy is freed before training (or the next model) goes on
    return outputs
