"""Format detection and normalization.

Each format is a small class: `fields` it is recognized by, and `normalize(row) -> record`. Detection looks at the
field names of the first rows; an explicit `data.format` skips detection. Every problem names the row's origin.
"""

from __future__ import annotations

import re

from tunelab.data.sources import Row
from tunelab.errors import UserError

ROLES = ("system", "user", "assistant")


def _check_messages(messages, origin: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{origin}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{origin}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{origin}: message {i} has role '{m['role']}'; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise UserError(f"{origin}: message {i} ({m['role']}) has empty or non-text content")
        if m["role"] == "system" and i != 0:
            raise UserError(f"{origin}: a system message may only come first (found at position {i})")
        out.append({"role": m["role"], "content": m["content"]})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for a, b in zip(turns, turns[1:]):
        if a == b:
            raise UserError(f"{origin}: two '{a}' messages in a row; turns must alternate user/assistant")
    if not turns or turns[0] != "user":
        raise UserError(f"{origin}: the first non-system message must be from the user")
    return out


def final_number(answer: str) -> str | None:
    """The gold number of a GSM8K-style answer ('... #### 72')."""
    m = re.search(r"####\s*(.+?)\s*$", answer.strip())
    return m.group(1).replace(",", "").strip() if m else None


# GSM8K answers carry calculator annotations (`<<48/2=24>>`) that a model would learn to imitate as noise.
_CALC = re.compile(r"<<[^<>]*=[^<>]*>>")


class Messages:
    name, fields, kind = "messages", ("messages",), "conversation"

    def normalize(self, row: Row) -> dict:
        return {"messages": _check_messages(row.data["messages"], row.origin)}


class ShareGPT:
    name, fields, kind = "sharegpt", ("conversations",), "conversation"
    ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

    def normalize(self, row: Row) -> dict:
        conv = row.data["conversations"]
        if not isinstance(conv, list):
            raise UserError(f"{row.origin}: 'conversations' must be a list of {{from, value}} objects")
        msgs = []
        for i, t in enumerate(conv):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise UserError(f"{row.origin}: turn {i} needs 'from' and 'value'")
            role = self.ROLE_MAP.get(str(t["from"]).lower())
            if role is None:
                raise UserError(f"{row.origin}: turn {i} has from='{t['from']}'; expected system/human/gpt")
            msgs.append({"role": role, "content": t["value"]})
        return {"messages": _check_messages(msgs, row.origin)}


class QuestionAnswer:
    name, fields, kind = "qa", ("question", "answer"), "conversation"

    def normalize(self, row: Row) -> dict:
        q, a = row.data["question"], row.data["answer"]
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{row.origin}: 'question' is empty or not text")
        if not isinstance(a, str) or not a.strip():
            raise UserError(f"{row.origin}: 'answer' is empty or not text")
        a = _CALC.sub("", a)
        rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        gold = final_number(a)
        if gold is not None:
            rec["answer"] = gold
        return rec


FORMATS = {f.name: f for f in (Messages(), ShareGPT(), QuestionAnswer())}


def detect(rows: list[Row], source: str) -> str:
    if not rows:
        raise UserError(f"{source}: no rows (the dataset is empty)")
    keys = set(rows[0].data)
    matches = [f.name for f in FORMATS.values() if set(f.fields) <= keys]
    if len(matches) == 1:
        return matches[0]
    near = [f.name for f in FORMATS.values() if set(f.fields) & keys]
    if not matches:
        raise UserError(f"{source}: could not detect the data format from fields {sorted(keys)}; "
                        f"nearly matched: {', '.join(near) or 'none'}; set data.format (one of {', '.join(FORMATS)}) "
                        "and data.columns to rename fields")
    raise UserError(f"{source}: fields {sorted(keys)} fit several formats ({', '.join(matches)}); set data.format")


def normalize(rows: list[Row], fmt: str, source: str, columns: dict[str, str] | None = None) -> list[dict]:
    if columns:
        for r in rows:
            for src, dst in columns.items():
                if src in r.data:
                    r.data[dst] = r.data.pop(src)
    name = detect(rows, source) if fmt == "auto" else fmt
    if name not in FORMATS:
        from tunelab.errors import suggest

        raise UserError(f"data.format '{name}' is unknown{suggest(name, FORMATS)}; known: {', '.join(FORMATS)}")
    f = FORMATS[name]
    out = []
    for r in rows:
        missing = [k for k in f.fields if k not in r.data]
        if missing:
            raise UserError(f"{r.origin}: missing field(s) {', '.join(missing)} for format '{name}'")
        out.append(f.normalize(r))
    return out
