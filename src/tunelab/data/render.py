"""Rendering conversations with the model's chat template into tokens and a loss mask.

The loss covers assistant turns only. TRL's `assistant_only_loss` needs `{% generation %}` markers that most shipped
templates (SmolLM2's included) lack, so we compute the mask ourselves: render the conversation once, render the
prefix before and after each assistant turn, and mark the characters each assistant turn adds (its text and the
end-of-turn token). Tokens are then labelled through the tokenizer's character offsets of the one full rendering,
so the token ids are exactly what the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data import templates
from tunelab.errors import UserError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    length: int = 0  # tokens before truncation: what data.max_length would have to be to keep the whole sample


def _render(tok, messages, add_generation_prompt=False) -> str:
    # A tokenizer without a template (a base model loaded outside models.load_tokenizer, which sets it) is rendered
    # with the same default that load_tokenizer would give it, rather than refused.
    template = None if getattr(tok, "chat_template", None) else templates.text(templates.DEFAULT, tok)
    # the loss-mask flag is ours, not the template's: render exactly the role/content the model will see
    messages = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       chat_template=template)
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. "roles must alternate")
        if isinstance(e, UserError):
            raise
        raise UserError(f"the chat template cannot render this conversation: {str(e).splitlines()[0]}; change the "
                        "row or use a template that accepts it (model.chat_template)") from None


render = _render


def default_system_prompt(tok) -> str | None:
    """The system prompt the chat template inserts by itself when a conversation has none (SmolLM2 does), or None.

    Found by rendering a conversation with a marker system prompt (to learn how a system turn looks) and one without,
    and looking for a system turn in the second.
    """
    marker, user = "\x1fSYSTEM\x1f", "\x1fUSER\x1f"
    try:
        with_sys = _render(tok, [{"role": "system", "content": marker}, {"role": "user", "content": user}])
        without = _render(tok, [{"role": "user", "content": user}])
    except UserError:
        return None  # templates without a system role
    if marker not in with_sys or user not in with_sys:
        return None
    start = with_sys.index(marker)
    header = with_sys[:start]
    between = with_sys[start + len(marker): with_sys.index(user)]  # end of system turn + user header
    # strip what both renderings open with (e.g. a BOS token) from the system header
    common = 0
    while common < min(len(header), len(without)) and header[common] == without[common]:
        common += 1
    sys_header = header[common:] or header
    pos = without.find(sys_header) if sys_header else -1
    if pos < 0:
        return None
    body_start = pos + len(sys_header)
    end = without.find(between, body_start)
    text = without[body_start:end] if end >= 0 else ""
    return text.strip() or None


def assistant_spans(tok, messages: list[dict], train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the character spans of each assistant turn in it (from message `train_from` on),
    leaving out turns marked `"train": False` (OpenAI's message weight 0: context the model sees, not a target)."""
    text = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from or m.get("train") is False:
            continue
        before = _render(tok, messages[:i], add_generation_prompt=True)
        after = _render(tok, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(after) and len(after) > len(before)):
            raise UserError("the chat template does not render conversations prefix by prefix, so assistant turns "
                            "cannot be located; set model.chat_template to a standard template")
        spans.append((len(before), len(after)))
    return text, spans


def encode_conversation(tok, messages: list[dict], max_length: int | None = None, train_from: int = 0) -> Encoded:
    """Tokens of the rendered conversation; labels keep the assistant turns from message `train_from` on (a
    preference pair's prompt may hold earlier assistant turns that are context, not targets)."""
    text, spans = assistant_spans(tok, messages, train_from)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tid, (start, end) in zip(ids, offsets):
        trained = any(s <= start < e for s, e in spans) and end > start
        labels.append(tid if trained else IGNORE)
    length = len(ids)
    truncated = max_length is not None and length > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated, length)


def end_of_turn_ids(tok, model_config=None) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, the end-of-turn token of the template in use (e.g. llama3's
    <|eot_id|>, which a base Llama 3's EOS is not; for a template not built in, the one its render shows) and the
    model's generation EOS ids."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    name = templates.identify(tok)
    end = templates.end_token(tok, name) if name else templates.own_end_token(tok)
    if end is not None and templates.single_token(tok, end) is not None:
        ids.add(templates.single_token(tok, end))
    gen_eos = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None) if model_config else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(gen_eos)
    return ids


def eos_trained(tok, enc: Encoded, model_config=None) -> bool:
    """Whether some end-of-turn token is among the trained labels (else the model never learns to stop)."""
    eot = end_of_turn_ids(tok, model_config)
    return any(lab in eot for lab in enc.labels if lab != IGNORE)


def mask_segments(tok, enc: Encoded) -> list[tuple[str, bool]]:
    """The sample as (text, trained) runs, for highlighting."""
    out, cur, trained = [], [], False
    for tid, lab in zip(enc.input_ids, enc.labels):
        t = lab != IGNORE
        if t != trained and cur:
            out.append((tok.decode(cur), trained))
            cur = []
        trained = t
        cur.append(tid)
    if cur:
        out.append((tok.decode(cur), trained))
    return out


def show_mask(tok, enc: Encoded, width: int = 2000) -> str:
    """The sample with trained spans in [[double brackets]]: what the pre-flight and `data inspect` print."""
    out, cur, trained = [], [], False
    for tid, lab in zip(enc.input_ids, enc.labels):
        t = lab != IGNORE
        if t != trained and cur:
            piece = tok.decode(cur)
            out.append(f"[[{piece}]]" if trained else piece)
            cur = []
        trained = t
        cur.append(tid)
    if cur:
        piece = tok.decode(cur)
        out.append(f"[[{piece}]]" if trained else piece)
    s = "".join(out)
    return s if len(s) <= width else s[:width] + " …"
