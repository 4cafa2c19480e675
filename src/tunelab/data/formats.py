"""Format detection and normalization.

Each format is a small class: the `fields` it needs, `optional` fields it understands, a `shape` check on values
(used only by detection, e.g. hh-rlhf's `\\n\\nHuman:` transcripts vs. preference message lists), and
`normalize(row) -> record` into one of the record kinds of `tunelab.data`. Detection takes, for each of the first
rows, every format whose fields and value shapes fit it and prefers the one that explains most of its fields (`text`
and `prompt` only when nothing else fits); the format that fits most rows wins, so one bad row (even the first) does
not decide for the file. A tie is an error, never a guess. An explicit `data.format` skips detection. Every row is
then checked against the chosen format, and every problem names the row's origin (`file:line`).
"""

from __future__ import annotations

import difflib
import json
import math
import re

from tunelab.data.sources import Row
from tunelab.errors import UserError, suggest

ROLES = ("system", "user", "assistant")
SUMMARIZE_PROMPT = "Summarize the following dialogue."


# ----------------------------------------------------------------------------------------------------- value checks

def _text(data: dict, key: str, origin: str, optional: bool = False) -> str:
    """A non-empty string field (numbers from CSV/Parquet are not silently turned into text)."""
    v = data.get(key)
    if v is None or (optional and v == ""):
        if optional:
            return ""
        raise UserError(f"{origin}: missing field '{key}'")
    if not isinstance(v, str):
        raise UserError(f"{origin}: '{key}' must be text, got {type(v).__name__}")
    if not v.strip():
        if optional:
            return ""
        raise UserError(f"{origin}: '{key}' is empty")
    return v


def _number_text(v):
    """A numeric answer (42, 3.5) as text; any other value unchanged, for the caller's type check. A bool or a NaN
    is not a number here: str() would turn them into the answers 'True' and 'nan'."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return str(v)
    return v


def _type_name(v) -> str:
    """The type to name in an error: of a list's first item that is not a string, else of the value itself."""
    if isinstance(v, list):
        return "a list holding " + next(type(x).__name__ for x in v if not isinstance(x, str))
    return type(v).__name__


def _cell(v, cells: bool):
    """A CSV/TSV cell (`cells`) holds message lists and other structure as JSON text: decode it when it parses.
    Any other source keeps its strings as they are: there a string is the text itself, even one that looks like JSON
    (a reply that is a JSON document is common in extraction data)."""
    if cells and isinstance(v, str) and v.lstrip().startswith(("[", "{")):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _cell_note(v, cells: bool) -> str:
    """Why a CSV cell meant to hold JSON (it starts with [ or {) did not decode, for the error that it is no list:
    a truncated or badly quoted cell otherwise reads as if the column held the wrong kind of value."""
    if cells and isinstance(v, str) and v.lstrip().startswith(("[", "{")):
        try:
            json.loads(v)
        except json.JSONDecodeError as e:
            at_end = e.pos >= len(v.rstrip())
            where = "the end of the cell" if at_end else f"character {e.pos + 1} of {len(v)}"
            # a string left open, or a value ending where the cell does: the usual mark of a cell cut short
            cut = at_end or e.msg.startswith("Unterminated string")
            return (f"; the cell could not be parsed as JSON ({e.msg.removesuffix(' at')} at {where}"
                    f"{': is it cut short?' if cut else ''})")
    return ""


def _is_message_list(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and "role" in m for m in v)


# Turns of tool-using conversations (OpenAI function calling, ShareGPT/LLaMA-Factory function_call/observation)
_TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation", "tool_call", "tool_response")


def _tool_turn(origin: str, where: str) -> UserError:
    return UserError(f"{origin}: {where} is a tool-call turn; tool calls are not supported: remove tool-call and "
                     "tool-result turns (or those samples) from the data")


def _message_weight(m: dict, origin: str, where: str) -> bool:
    """OpenAI fine-tuning's per-message `weight`: 1 trains the turn, 0 keeps it as context only."""
    w = m.get("weight", 1)
    if isinstance(w, bool) or (isinstance(w, (int, float)) and w in (0, 1)):
        return bool(w)
    raise UserError(f"{origin}: {where} has weight {w!r}; a message weight is 0 (context, not trained) or 1 (trained)")


def _content(c, origin: str, where: str) -> str:
    # multimodal-style content: [{"type": "text", "text": ...}, ...] -> its text parts joined by newlines, as the
    # API server (and vLLM) joins them: a model trains on the text it is served
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        if any(p.get("type", "text") != "text" for p in c):
            raise UserError(f"{origin}: {where} has non-text content parts; only text is supported")
        bad = next((i for i, p in enumerate(c) if not isinstance(p.get("text"), str)), None)
        if bad is not None:
            raise UserError(f"{origin}: {where} content part {bad}: a text part's 'text' must be a string, got "
                            f"{type(c[bad].get('text')).__name__}")
        c = "\n".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise UserError(f"{origin}: {where} content must be text, got {type(c).__name__}")
    if not c.strip():
        raise UserError(f"{origin}: {where} has empty content")
    return c


def _check_messages(messages, origin: str, key: str = "messages", need_user_first: bool = True,
                    weights: bool = False, note: str = "") -> list[dict]:
    """Validated [{role, content}] list: known roles, text content, system first only, user/assistant alternating.

    An empty system message is dropped (it says nothing; alpaca's empty `system` is treated the same way).
    `weights`: honour OpenAI's per-message `weight` (0: the assistant turn is context, marked `"train": False`).
    `note`: appended to the error when `messages` is no list (see `_cell_note`).
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{origin}: '{key}' must be a non-empty list of {{role, content}} objects{note}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call") or m.get("role") in _TOOL_ROLES):
            raise _tool_turn(origin, f"{key}[{i}]")
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{origin}: {key}[{i}] needs 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise UserError(f"{origin}: {key}[{i}] has role '{role}'{suggest(role, ROLES)}; "
                            f"expected one of {', '.join(ROLES)}")
        if role == "system" and (m["content"] is None or (isinstance(m["content"], str) and not m["content"].strip())):
            continue
        content = _content(m["content"], origin, f"{key}[{i}] ({role})")
        if role == "system" and out:
            raise UserError(f"{origin}: {key}[{i}]: a system message may only come first")
        msg = {"role": role, "content": content}
        if weights and not _message_weight(m, origin, f"{key}[{i}]") and role == "assistant":
            msg["train"] = False  # render.assistant_spans leaves it out of the loss
        out.append(msg)
    turns = [m["role"] for m in out if m["role"] != "system"]
    for a, b in zip(turns, turns[1:]):
        if a == b:
            raise UserError(f"{origin}: {key}: two '{a}' messages in a row; turns must alternate user/assistant")
    if not turns:
        raise UserError(f"{origin}: '{key}' holds only a system message")
    if need_user_first and turns[0] != "user":
        raise UserError(f"{origin}: {key}: the first non-system message must be from the user (found '{turns[0]}')")
    return out


def _as_messages(v, role: str, origin: str, key: str, cells: bool = False) -> list[dict]:
    """A string becomes one message of `role`; a list is validated as messages. A CSV cell (`cells`) is taken as a
    message list only when it is the JSON of one; any other cell is text."""
    decoded = _cell(v, cells)
    if _is_message_list(decoded):
        v = decoded
    if isinstance(v, str):
        if not v.strip():
            raise UserError(f"{origin}: '{key}' is empty")
        return [{"role": role, "content": v}]
    if isinstance(v, list):
        return _check_messages(v, origin, key, need_user_first=(role == "user"))
    if v is None:
        raise UserError(f"{origin}: missing field '{key}'")
    raise UserError(f"{origin}: '{key}' must be text or a list of messages, got {type(v).__name__}")


def _split_shared_prompt(chosen: list[dict], rejected: list[dict], origin: str) -> tuple[list, list, list]:
    """Full conversations that share their opening -> (shared prompt turns, chosen reply, rejected reply)."""
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{origin}: '{key}' ends with a {msgs[-1]['role']} message; a full conversation in a "
                            "preference pair ends with the assistant's reply")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # back up to the start of the differing assistant reply: the prompt must end with the user's turn
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not c or not r or c == r:
        raise UserError(f"{origin}: 'chosen' and 'rejected' are identical; a preference pair needs two different replies")
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f"{origin}: 'chosen' and 'rejected' do not share the conversation before their final reply")
    if any(m["role"] != "assistant" for m in c + r):
        raise UserError(f"{origin}: 'chosen' and 'rejected' differ before the final assistant reply "
                        "(they must share every turn up to it)")
    return prompt, c, r


def final_number(answer: str) -> str | None:
    """The gold number of a GSM8K-style answer ('... #### 72')."""
    m = re.search(r"####\s*(.+?)\s*$", answer.strip())
    return m.group(1).replace(",", "").strip() if m else None


# GSM8K answers carry calculator annotations (`<<48/2=24>>`) that a model would learn to imitate as noise.
_CALC = re.compile(r"<<[^<>]*=[^<>]*>>")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def parse_hh(transcript, origin: str, key: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    if not isinstance(transcript, str):
        raise UserError(f"{origin}: '{key}' must be a transcript string, got {type(transcript).__name__}")
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{origin}: '{key}' is not a '\\n\\nHuman: …\\n\\nAssistant: …' transcript")
    msgs = []
    for i in range(1, len(parts), 2):
        role = "user" if parts[i] == "Human" else "assistant"
        content = parts[i + 1].strip()
        if not content:
            raise UserError(f"{origin}: '{key}' has an empty {'Human' if role == 'user' else 'Assistant'} turn "
                            f"(turn {i // 2 + 1})")
        msgs.append({"role": role, "content": content})
    if msgs[-1]["role"] != "assistant":  # the final Assistant turn is the reply a pair compares
        where = "has no Assistant turn" if len(msgs) == 1 else "ends with a Human turn"
        raise UserError(f"{origin}: the '{key}' transcript {where}; it must end with '\\n\\nAssistant: <reply>'")
    return _check_messages(msgs, origin, key)


def _label(v, origin: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):  # Parquet/pandas often store labels as 1.0/0.0
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "1.0", "0.0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "1.0", "yes")
    raise UserError(f"{origin}: 'label' must be true/false (desirable or not), got {v!r}")


# ----------------------------------------------------------------------------------------------------------- formats

class Format:
    name = ""
    kind = "conversation"
    fields: tuple[str, ...] = ()  # all needed
    optional: tuple[str, ...] = ()  # understood when present (they count towards detection)
    fallback = False  # only chosen when nothing else fits (plain `text` sits beside many other fields)
    reference: str | None = None  # the field holding the reference reply; `<field>1..N` are several references
    doc = ""

    def shape(self, row: Row) -> bool:
        """Whether the values look like this format (detection only; normalize checks fully)."""
        return True

    def normalize(self, row: Row) -> dict:
        raise NotImplementedError


class Messages(Format):
    name, fields, optional = "messages", ("messages",), ("system",)
    doc = 'OpenAI chat: {"messages": [{"role": "system|user|assistant", "content": ...}, ...]}'

    def shape(self, row):
        return isinstance(_cell(row.data["messages"], row.cells), list)

    def normalize(self, row):
        v = row.data["messages"]
        msgs = _check_messages(_cell(v, row.cells), row.origin, weights=True, note=_cell_note(v, row.cells))
        return {"messages": _with_system(msgs, row.data, row.origin)}


class ShareGPT(Format):
    name, fields, optional = "sharegpt", ("conversations",), ("system",)
    doc = 'ShareGPT: {"conversations": [{"from": "system|human|gpt", "value": ...}, ...]}'
    ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}

    def shape(self, row):
        return isinstance(_cell(row.data["conversations"], row.cells), list)

    def normalize(self, row):
        conv = _cell(row.data["conversations"], row.cells)
        if not isinstance(conv, list) or not conv:
            raise UserError(f"{row.origin}: 'conversations' must be a non-empty list of {{from, value}} objects"
                            f"{_cell_note(row.data['conversations'], row.cells)}")
        msgs = []
        for i, t in enumerate(conv):
            if isinstance(t, dict) and "role" in t and "content" in t:  # some ShareGPT dumps use OpenAI keys
                t = {"from": t["role"], "value": t["content"]}
            if isinstance(t, dict) and str(t.get("from", "")).lower() in _TOOL_ROLES:
                raise _tool_turn(row.origin, f"conversations[{i}]")
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise UserError(f"{row.origin}: conversations[{i}] needs 'from' and 'value'")
            role = self.ROLE_MAP.get(str(t["from"]).lower())
            if role is None:
                raise UserError(f"{row.origin}: conversations[{i}] has from='{t['from']}'; expected system/human/gpt")
            msgs.append({"role": role, "content": t["value"]})
        return {"messages": _check_messages(_with_system(msgs, row.data, row.origin), row.origin, "conversations")}


def _instruction(d: dict, origin: str, extra_key: str, heading: str) -> str:
    """The user turn of instruction data: the instruction, then the optional input/context under a heading."""
    user = _text(d, "instruction", origin)
    extra = _text(d, extra_key, origin, optional=True)
    return f"{user}\n\n{heading}{extra}" if extra else user


class Alpaca(Format):
    name, fields, optional, reference = "alpaca", ("instruction", "output"), ("input", "system", "history"), "output"
    doc = 'Alpaca: {"instruction", "input" (may be empty), "output"} (+ optional "system", "history": [[q, a], ...])'

    def normalize(self, row):
        d, o = row.data, row.origin
        user = _instruction(d, o, "input", "")
        msgs = []
        system = _text(d, "system", o, optional=True)
        if system:
            msgs.append({"role": "system", "content": system})
        history = _cell(d.get("history"), row.cells) or []
        if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
            raise UserError(f"{o}: 'history' must be a list of [instruction, response] pairs")
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(d, "output", o)}]
        return {"messages": _check_messages(msgs, o)}


class Dolly(Format):
    name, fields, optional, reference = "dolly", ("instruction", "response"), ("context", "category"), "response"
    doc = 'Dolly: {"instruction", "context" (may be empty), "response", "category"}'

    def normalize(self, row):
        d, o = row.data, row.origin
        user = _instruction(d, o, "context", "Context:\n")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": _text(d, "response", o)}]}


def _with_system(msgs: list[dict], d: dict, origin: str) -> list[dict]:
    """Prepend a row-level `system` text to a conversation that has no system message of its own."""
    system = _text(d, "system", origin, optional=True)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


class PromptCompletion(Format):
    name, fields, optional = "prompt_completion", ("prompt", "completion"), ("system",)
    doc = 'Prompt/completion: {"prompt", "completion"} as text or message lists (+ optional "system")'

    def normalize(self, row):
        d, o = row.data, row.origin
        prompt = _with_system(_as_messages(d.get("prompt"), "user", o, "prompt", row.cells), d, o)
        completion = _as_messages(d.get("completion"), "assistant", o, "completion", row.cells)
        return {"messages": _check_messages(prompt + completion, o, "prompt + completion")}


class Text(Format):
    name, kind, fields, fallback = "text", "text", ("text",), True
    doc = 'Plain text for language modelling: {"text"} (or a .txt file, one sample per line)'

    def shape(self, row):
        return isinstance(row.data["text"], str)

    def normalize(self, row):
        return {"text": _text(row.data, "text", row.origin)}


class QuestionAnswer(Format):
    name, fields = "qa", ("question", "answer")
    doc = ('Question/answer: {"question", "answer"}; GSM8K "#### N" answers keep N as the gold answer, '
           'TriviaQA-style {"value", "aliases"} answers keep their aliases')

    def normalize(self, row):
        d, o = row.data, row.origin
        q = _text(d, "question", o)
        a = d.get("answer")
        decoded = _cell(a, row.cells)  # a CSV cell may hold a JSON alias list or TriviaQA object
        if isinstance(decoded, (list, dict)):
            a = decoded
        aliases = None
        given = a  # named in the error when nothing usable comes out of it
        if isinstance(a, dict):  # TriviaQA: {"value": "Paris", "aliases": ["Paris", "paris, france"], ...}
            if a.get("value") is None and not (a.get("aliases") or a.get("normalized_aliases")):
                raise UserError(f"{o}: 'answer' is a dict without 'value' or 'aliases' (keys: "
                                f"{', '.join(map(str, a)) or 'none'}); give the answer as text, a list of acceptable "
                                'answers, or a TriviaQA-style {"value", "aliases"} object')
            aliases = a.get("aliases") or a.get("normalized_aliases") or []
            # checked before use: a string here would be read letter by letter
            if not isinstance(aliases, list) or not all(isinstance(x, str) for x in aliases):
                raise UserError(f"{o}: answer aliases must be a list of strings, got {_type_name(aliases)}")
            a = a.get("value") if a.get("value") is not None else (aliases[0] if aliases else None)
        elif isinstance(a, list):  # a list of acceptable answers, the first one canonical
            if not all(isinstance(x, str) for x in a):
                raise UserError(f"{o}: a list 'answer' must hold strings (acceptable answers), got "
                                f"{_type_name(a)}")
            aliases, a = a, (a[0] if a else None)
        a = _number_text(a)  # {"answer": 42}
        if not isinstance(a, str) or not a.strip():
            if given == []:
                raise UserError(f"{o}: 'answer' is an empty list; give at least one acceptable answer")
            got = "null" if a is None else repr(a) if isinstance(a, str) else type(a).__name__
            where = {dict: "'answer' (its 'value', else its first alias)", list: "'answer' (its first entry)"}
            raise UserError(f"{o}: {where.get(type(given), repr('answer'))} is empty or not text (got {got})")
        a = _CALC.sub("", a)
        rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        gold = final_number(a)
        rec["answer"] = gold if gold is not None else a.strip()
        if aliases:
            rec["aliases"] = list(dict.fromkeys([a.strip(), *aliases]))
        return rec


class DialogueSummary(Format):
    name, fields, optional, reference = "dialogue_summary", ("dialogue", "summary"), ("topic", "fname", "id"), "summary"
    doc = (f'Dialogue summarization (DialogSum): {{"dialogue", "summary"}} -> "{SUMMARIZE_PROMPT}" + dialogue; '
           'several references as "summary1".."summaryN" (DialogSum test) or a "references" list')

    def normalize(self, row):
        d, o = row.data, row.origin
        dialogue, summary = _text(d, "dialogue", o), _text(d, "summary", o)
        return {"messages": [{"role": "user", "content": f"{SUMMARIZE_PROMPT}\n\n{dialogue}"},
                             {"role": "assistant", "content": summary}], "answer": summary}


class PromptOnly(Format):
    name, kind, fields, optional, fallback = "prompt", "prompt", ("prompt",), ("answer", "solution", "system"), True
    doc = ('Prompt-only (GRPO/PPO): {"prompt"} as text or messages, with an optional gold "answer" (or "solution")')

    def normalize(self, row):
        d, o = row.data, row.origin
        prompt = _with_system(_as_messages(d.get("prompt"), "user", o, "prompt", row.cells), d, o)
        if prompt[-1]["role"] != "user":
            raise UserError(f"{o}: 'prompt' must end with the user's turn")
        rec = {"prompt": prompt}
        gold = d.get("answer", d.get("solution"))
        if gold is not None:
            gold = _number_text(gold)
            if not isinstance(gold, str):
                raise UserError(f"{o}: 'answer' must be text or a number, got {type(gold).__name__}")
            rec["answer"] = final_number(gold) or gold.strip()
        return rec


class Preference(Format):
    name, kind, fields, optional = "preference", "preference", ("chosen", "rejected"), ("prompt", "system")
    doc = ('Preference pairs: {"prompt", "chosen", "rejected"} as text or message lists (+ optional "system"); '
           'without "prompt", chosen/rejected are full conversations sharing their opening')

    def shape(self, row):
        # without a prompt, only message lists can carry it (transcript strings are the hh-rlhf format)
        return "prompt" in row.data or isinstance(_cell(row.data["chosen"], row.cells), list)

    def normalize(self, row):
        d, o, cells = row.data, row.origin, row.cells
        if d.get("prompt") is None:
            if not isinstance(_cell(d.get("chosen"), cells), list):
                raise UserError(f"{o}: without a 'prompt' field, 'chosen' and 'rejected' must be full conversations "
                                "(message lists) or hh-rlhf transcripts; add a prompt field or map one with data.columns")
            chosen = _as_messages(_cell(d.get("chosen"), cells), "user", o, "chosen")
            rejected = _as_messages(_cell(d.get("rejected"), cells), "user", o, "rejected")
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected, o)
            return {"prompt": _with_system(prompt, d, o), "chosen": chosen, "rejected": rejected}
        prompt = _with_system(_as_messages(d.get("prompt"), "user", o, "prompt", cells), d, o)
        chosen = _as_messages(d.get("chosen"), "assistant", o, "chosen", cells)
        rejected = _as_messages(d.get("rejected"), "assistant", o, "rejected", cells)
        # some datasets repeat the prompt inside chosen/rejected (full conversations): keep only the replies
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
            chosen, rejected = chosen[n:], rejected[n:]
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[0]["role"] != "assistant":
                raise UserError(f"{o}: '{key}' must be the assistant's reply to the prompt (starts with "
                                f"'{msgs[0]['role']}')")
        _check_messages(prompt + chosen, o, "prompt + chosen")
        if chosen == rejected:
            raise UserError(f"{o}: 'chosen' and 'rejected' are identical; a preference pair needs two different replies")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


class HHRLHF(Format):
    name, kind, fields = "hh_rlhf", "preference", ("chosen", "rejected")
    doc = ('Anthropic hh-rlhf: {"chosen", "rejected"} transcripts "\\n\\nHuman: …\\n\\nAssistant: …" -> shared '
           'prompt turns + the differing final reply')

    def shape(self, row):
        c = row.data["chosen"]
        return "prompt" not in row.data and isinstance(c, str) and "\n\nHuman:" in c

    def normalize(self, row):
        d, o = row.data, row.origin
        chosen = parse_hh(d.get("chosen"), o, "chosen")
        rejected = parse_hh(d.get("rejected"), o, "rejected")
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected, o)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


class KTO(Format):
    name, kind, fields, optional = "kto", "kto", ("prompt", "completion", "label"), ("system",)
    doc = 'KTO: {"prompt", "completion", "label": true|false} (text or message lists, + optional "system")'

    def normalize(self, row):
        d, o = row.data, row.origin
        prompt = _with_system(_as_messages(d.get("prompt"), "user", o, "prompt", row.cells), d, o)
        completion = _as_messages(d.get("completion"), "assistant", o, "completion", row.cells)
        _check_messages(prompt + completion, o, "prompt + completion")
        return {"prompt": prompt, "completion": completion, "label": _label(d.get("label"), o)}


FORMATS: dict[str, Format] = {f.name: f for f in (
    Messages(), ShareGPT(), Alpaca(), Dolly(), PromptCompletion(), Text(), QuestionAnswer(), DialogueSummary(),
    Preference(), HHRLHF(), KTO(), PromptOnly())}
ALIASES = {"openai": "messages", "chatml": "messages", "hh-rlhf": "hh_rlhf", "dialogsum": "dialogue_summary",
           "prompt-completion": "prompt_completion", "gsm8k": "qa", "question_answer": "qa", "dpo": "preference"}


# --------------------------------------------------------------------------------------------- detection + normalize

# ------------------------------------------------------------------------------------------ several references

REFERENCES = "references"  # a list of reference replies, for any conversation format


def _numbered(data: dict, base: str) -> list[str]:
    """`base1`, `base2`, ... keys of a row, in number order (DialogSum's test split: summary1..summary3)."""
    return sorted((k for k in data if k[len(base):].isdigit() and k.startswith(base)), key=lambda k: int(k[len(base):]))


def _fields_of(f: Format, data: dict) -> set:
    """The row's fields as format `f` sees them: numbered references or a `references` list stand in for the
    format's reference field when the row has no such field."""
    keys = set(data)
    if f.reference and f.reference not in keys and (REFERENCES in keys or _numbered(data, f.reference)):
        keys.add(f.reference)
    return keys


def _references(f: Format, row: Row) -> tuple[Row, list[str] | None]:
    """(the row as `f.normalize` reads it, its references when it has several).

    References come from a `references` list, else from `<reference field>1..N` (after the field itself, when the
    row has both). Training reads the reference field, which is the first reference when the row has no such field.
    """
    d, o = row.data, row.origin
    refs: list[str] = []
    if f.kind != "conversation":  # preference pairs, prompts and plain text have no reply to score
        return row, None
    if REFERENCES in d:
        v = _cell(d[REFERENCES], row.cells)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise UserError(f"{o}: '{REFERENCES}' must be a non-empty list of reference texts")
        refs = list(v)
    elif f.reference:
        numbered = _numbered(d, f.reference)
        if numbered:
            refs = ([_text(d, f.reference, o)] if f.reference in d else []) + [_text(d, k, o) for k in numbered]
    if not refs:
        return row, None
    if f.reference and f.reference not in d:
        row = Row({**d, f.reference: refs[0]}, o, row.cells)
    return row, refs


def _fits(f: Format, row: Row) -> bool:
    if not set(f.fields) <= _fields_of(f, row.data):
        return False
    try:
        return bool(f.shape(row))
    except Exception:  # noqa: BLE001 - a value of an unexpected type simply does not fit this format
        return False


# Rows that detection looks at: enough that a bad first row (a typo, a value of the wrong type) is outvoted by the
# rows after it, few enough that detection stays instant on a large file.
DETECT_ROWS = 100


def _row_formats(row: Row) -> list[str]:
    """The formats that explain one row best: those whose fields and value shapes fit it, preferring the one that
    reads most of its fields (`text` and `prompt` only when nothing else fits); several on a tie, none if none fit."""
    fits = [f for f in FORMATS.values() if _fits(f, row)]
    if fits and not all(f.fallback for f in fits):
        fits = [f for f in fits if not f.fallback]
    score = {f.name: len((set(f.fields) | set(f.optional)) & _fields_of(f, row.data)) for f in fits}
    best = max(score.values(), default=0)
    return [n for n, s in score.items() if s == best]


def _misspelt(keys, fields) -> list[str]:
    """'massages' -> 'messages' hints for keys of a row that look like misspellings of `fields`."""
    out = []
    for k in sorted(keys):
        if k not in fields:
            match = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.75)
            if match:
                out.append(f"'{k}': did you mean '{match[0]}'?")
    return out


def _why_not(f: Format, row: Row) -> str:
    """': <the problem>' that format `f` finds in a row with its fields, to say why the values do not fit."""
    try:
        f.normalize(row)
    except UserError as e:
        return ": " + str(e).removeprefix(f"{row.origin}: ")
    except Exception:  # noqa: BLE001 - a value of an unexpected type: the plain 'values do not fit' says enough
        pass
    return ""


def detect(rows: list[Row], source: str) -> str:
    """The format of a source: the one that fits most of its first rows (every row is then checked against it, so
    a row that differs, even the first one, is reported or skipped by its own file:line). A tie is an error, never
    a guess."""
    if not rows:
        raise UserError(f"{source}: no rows (the dataset is empty)")
    looked = rows[:DETECT_ROWS]
    per_row = [_row_formats(r) for r in looked]
    support: dict[str, int] = {}
    for names in per_row:
        for n in names:
            support[n] = support.get(n, 0) + 1
    if not support:
        first = rows[0]
        keys = set(first.data)
        near = []
        for f in FORMATS.values():
            have = [k for k in f.fields if k in keys]
            if have:
                missing = [k for k in f.fields if k not in keys]
                near.append(f"{f.name} (missing {', '.join(missing)})" if missing
                            else f"{f.name} (values do not fit{_why_not(f, first)})")
        known = {k for f in FORMATS.values() for k in (*f.fields, *f.optional)}
        typos = "".join(f" ({t})" for t in _misspelt(keys, known))
        raise UserError(f"{first.origin}: could not detect the data format from fields {sorted(keys)}{typos}; "
                        f"nearly matched: {'; '.join(near) or 'none'}; set data.format "
                        f"(one of {', '.join(FORMATS)}) and data.columns to map your field names")
    best = max(support.values())
    top = [n for n in FORMATS if support.get(n) == best]
    if len(top) > 1 and not all(FORMATS[n].fallback for n in top):
        top = [n for n in top if not FORMATS[n].fallback]
    if len(top) == 1:
        return top[0]
    # the same fields fit several formats (a row that has both `messages` and `conversations`)
    both = next((r for r, names in zip(looked, per_row) if set(top) <= set(names)), None)
    if both is not None:
        raise UserError(f"{both.origin}: fields {sorted(both.data)} fit several formats ({', '.join(top)}); "
                        f"set data.format to one of them")
    # rows of different formats, as many of each
    firsts = [next(r.origin for r, names in zip(looked, per_row) if n in names) for n in top]
    split = ", ".join(f"{n} ({best} row{'s' * (best > 1)}, first {o})" for n, o in zip(top, firsts))
    which = "its rows" if len(looked) == len(rows) else f"its first {len(looked)} rows"
    raise UserError(f"{source}: {which} fit different formats equally often: {split}; "
                    "set data.format to one of them (rows of the others are then reported as invalid)")


def unknown_format(fmt: str | None) -> str | None:
    """Why `fmt` is not a format name or alias (None when it is one, or "auto")."""
    if fmt is None or fmt == "auto" or fmt in FORMATS or fmt in ALIASES:
        return None
    return f"unknown data format '{fmt}'{suggest(fmt, [*FORMATS, *ALIASES])}; known: auto, {', '.join(FORMATS)}"


def check_config(data) -> None:
    """The format names of a DataConfig (data.format and each source's format), checked before anything loads."""
    sources = []
    for spec in (data.train, data.validation):
        sources += spec if isinstance(spec, list) else [spec] if spec is not None else []
    named = [(f"source {s.path!r}: format", s.format) for s in sources if not isinstance(s, str)]
    for key, fmt in [("config key 'data.format'", data.format), *named]:
        why = unknown_format(fmt)
        if why:
            raise UserError(f"{key}: {why}")


def resolve_format(fmt: str) -> str:
    name = ALIASES.get(fmt, fmt)
    if name != "auto" and name not in FORMATS:
        raise UserError(f"data.format '{fmt}' is unknown{suggest(fmt, [*FORMATS, *ALIASES])}; "
                        f"known: auto, {', '.join(FORMATS)}")
    return name


def rename_columns(rows: list[Row], columns: dict[str, str] | None, source: str, used: set | None = None) -> None:
    """Apply a rename map (your field -> expected field) in place.

    `used`: None means the map belongs to this source, so a key it never finds is a mistake reported now; a set
    collects the keys found, for a map shared by several sources (checked once all of them are read).
    """
    if not columns:
        return
    found = {src for src in columns if any(src in r.data for r in rows[:100])}
    if used is None:
        if rows and not found:
            raise UserError(f"{source}: none of the columns keys ({', '.join(columns)}) is a field of the data "
                            f"(fields: {', '.join(sorted(rows[0].data))})")
    else:
        used |= found
    # all at once, as `datasets`' rename_columns does: a swap {chosen: rejected, rejected: chosen} exchanges the two
    for r in rows:
        moved = {src: dst for src, dst in columns.items() if src in r.data}
        for dst in set(moved.values()):
            givers = [s for s, d in moved.items() if d == dst] + [dst] * (dst in r.data and dst not in moved)
            if len(givers) > 1:  # one value would silently overwrite the other
                raise UserError(f"{r.origin}: data.columns gives field '{dst}' two values (from fields "
                                f"{' and '.join(repr(g) for g in givers)}); map only one field to '{dst}'")
        r.data.update({dst: r.data.pop(src) for src, dst in moved.items()})


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, (list, dict)):
        for x in v.values() if isinstance(v, dict) else v:
            yield from _strings(x)


def _check_unicode(rec: dict, origin: str) -> None:
    """JSON can spell half of a surrogate pair (`\\ud800`); Python keeps it as a lone surrogate that is not valid
    text, and the tokenizer refuses it with a traceback. Refuse the row here, where its origin is known."""
    for text in _strings(rec):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{origin}: invalid unicode (a lone surrogate {text[e.start]!r} after "
                            f"{text[max(0, e.start - 20):e.start]!r}); \\ud800-\\udfff escapes come in pairs: fix "
                            "the text or remove the row") from None


def normalize_rows(rows: list[Row], fmt: str, source: str, columns: dict[str, str] | None = None,
                   problems: list[str] | None = None, columns_used: set | None = None) -> tuple[str, list[dict]]:
    """(format name, records). Each record carries its row's `origin`.

    `problems`: when given, invalid rows are recorded there (as one-line messages) and skipped instead of raising.
    `columns_used`: see `rename_columns`.
    """
    rename_columns(rows, columns, source, columns_used)
    name = resolve_format(fmt)
    if name == "auto":
        name = detect(rows, source)
    f = FORMATS[name]
    out = []
    for r in rows:
        try:
            missing = [k for k in f.fields if k not in _fields_of(f, r.data)]
            if missing:
                typos = "".join(f"; {t}" for t in _misspelt(r.data, missing))
                raise UserError(f"{r.origin}: missing field(s) {', '.join(missing)} for format '{name}' "
                                f"(fields here: {', '.join(sorted(r.data))}{typos}; map yours with data.columns)")
            row, refs = _references(f, r)
            rec = f.normalize(row)
            if refs and "messages" in rec:  # evaluation scores against every reference; training uses the reply
                rec[REFERENCES] = refs
            _check_unicode(rec, r.origin)
        except UserError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        rec["origin"] = r.origin
        out.append(rec)
    return name, out


def unused_fields(fmt: str, data: dict) -> list[str]:
    """Fields of a row that format `fmt` does not read (a reply in a field it does not know is silently lost)."""
    f = FORMATS[resolve_format(fmt)]
    known = set(f.fields) | set(f.optional) | {REFERENCES}
    if f.reference:
        known |= set(_numbered(data, f.reference))
    return sorted(k for k in data if k not in known)


def normalize(rows: list[Row], fmt: str, source: str, columns: dict[str, str] | None = None) -> list[dict]:
    return normalize_rows(rows, fmt, source, columns)[1]


# ----------------------------------------------------------------------------------------------- record kind views

def conversation(rec: dict) -> list[dict] | None:
    """The messages a record trains on as a conversation (preference: prompt + chosen; kto: prompt + completion)."""
    if "messages" in rec:
        return rec["messages"]
    if "chosen" in rec:
        return rec["prompt"] + rec["chosen"]
    if "completion" in rec:
        return rec["prompt"] + rec["completion"]
    if "prompt" in rec:
        return rec["prompt"]
    return None


def kind_of(rec: dict) -> str:
    if "messages" in rec:
        return "conversation"
    if "chosen" in rec:
        return "preference"
    if "label" in rec:
        return "kto"
    if "text" in rec:
        return "text"
    return "prompt"  # {"prompt": [...], "answer"?}
