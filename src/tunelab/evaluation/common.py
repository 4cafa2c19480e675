"""What the evaluation tasks share: reading data through the data layer, and splitting a record into the prompt the
model is asked and the reference reply it is scored against."""

from __future__ import annotations

from tunelab.errors import UserError


def load_records(spec: str, fmt: str = "auto", n: int | None = None) -> list[dict]:
    """Normalized records of any source the data layer reads (same detection and prompts as training), first `n`."""
    from tunelab.config import DataConfig
    from tunelab.data.build import load_records as _load

    records = _load(spec, DataConfig(train=spec, format=fmt))
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
