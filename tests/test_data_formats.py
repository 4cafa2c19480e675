"""Every supported format is detected from its fixture and normalized into the documented record kinds."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tunelab.data import formats
from tunelab.data.sources import Row, read_source
from tunelab.errors import UserError

DATA = Path(__file__).parent / "assets" / "data"
FMT = DATA / "formats"


def load(name: str, fmt: str = "auto", columns=None):
    path = str(FMT / name)
    return formats.normalize_rows(read_source(path), fmt, path, columns)


@pytest.mark.parametrize("fixture, expected", [
    ("messages.jsonl", "messages"), ("sharegpt.json", "sharegpt"), ("alpaca.json", "alpaca"),
    ("dolly.jsonl", "dolly"), ("prompt_completion.jsonl", "prompt_completion"), ("text.txt", "text"),
    ("qa_gsm8k.jsonl", "qa"), ("qa_trivia.jsonl", "qa"), ("dialogue_summary.jsonl", "dialogue_summary"),
    ("preference_strings.jsonl", "preference"), ("preference_messages.jsonl", "preference"),
    ("hh_rlhf.jsonl", "hh_rlhf"), ("kto.csv", "kto"), ("prompt_only.jsonl", "prompt"),
])
def test_every_format_is_detected(fixture, expected):
    name, records = load(fixture)
    assert name == expected
    assert records and all(r["origin"].startswith(str(FMT / fixture)) for r in records)
    # the explicit format gives the same records as detection
    assert load(fixture, fmt=expected)[1] == records


def test_messages_keep_system_and_turns():
    _, (a, b) = load("messages.jsonl")
    assert [m["role"] for m in a["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert b["messages"][-1] == {"role": "assistant", "content": "Hi!"}
    assert a["origin"].endswith("messages.jsonl:1") and b["origin"].endswith("messages.jsonl:2")


def test_text_content_parts_are_joined_as_the_server_joins_them():
    """[{"type": "text"}, ...] content is trained as the API server feeds it: parts joined by newlines."""
    from tunelab.inference.server import Message

    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    (rec,) = formats.normalize_rows([Row({"messages": [{"role": "user", "content": parts},
                                                      {"role": "assistant", "content": "Paris."}]}, "x.jsonl:1")],
                                    "auto", "x.jsonl")[1]
    served = Message(role="user", content=parts).as_dict()["content"]
    assert rec["messages"][0]["content"] == served == "What is the capital\nof France?"


def test_sharegpt_roles_mapped():
    _, (a, _b) = load("sharegpt.json")
    assert a["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How are you?"},
                             {"role": "assistant", "content": "Fine, thanks."}]
    assert a["origin"].endswith("sharegpt.json:row 1")


def test_alpaca_and_dolly_join_input_and_context():
    _, (a, b) = load("alpaca.json")
    assert a["messages"][0]["content"] == "Translate to French.\n\nGood morning"
    assert b["messages"][0]["content"] == "Name a primary colour."  # empty input adds nothing
    _, (d, _e) = load("dolly.jsonl")
    assert d["messages"][0]["content"].endswith("Context:\nThe Eiffel Tower was finished in 1889.")
    assert d["messages"][1] == {"role": "assistant", "content": "In 1889."}


def test_prompt_completion_text_and_lists():
    _, (a, b) = load("prompt_completion.jsonl")
    assert a["messages"] == [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]
    assert b["messages"][1]["content"] == "red."


def test_text_lines():
    _, recs = load("text.txt")
    assert [r["text"] for r in recs] == ["The quick brown fox jumps over the lazy dog.", "A second line of plain text."]
    assert recs[1]["origin"].endswith("text.txt:3")  # the blank line 2 is skipped, line numbers kept
    assert formats.kind_of(recs[0]) == "text"


def test_gsm8k_gold_answer_and_calculator_notes():
    _, (a, b) = load("qa_gsm8k.jsonl")
    assert a["answer"] == "7" and b["answer"] == "2000"
    assert "<<" not in a["messages"][1]["content"]


def test_trivia_aliases():
    _, (a, b) = load("qa_trivia.jsonl")
    assert a["answer"] == "Paris" and a["messages"][1]["content"] == "Paris"
    assert a["aliases"] == ["Paris", "Paris, France", "City of Light"]
    assert b["answer"] == "Jupiter" and b["aliases"] == ["Jupiter", "planet Jupiter"]


def test_dialogue_summary():
    _, (a, _b) = load("dialogue_summary.jsonl")
    assert a["messages"][0]["content"].startswith(formats.SUMMARIZE_PROMPT)
    assert a["answer"] == "#Person2# says the shop is open until six."


def test_preference_strings_and_messages():
    _, (a, _b) = load("preference_strings.jsonl")
    assert a["prompt"] == [{"role": "user", "content": "Write a greeting."}]
    assert a["chosen"] == [{"role": "assistant", "content": "Hello, nice to meet you!"}]
    assert a["rejected"] == [{"role": "assistant", "content": "go away"}]
    _, (m,) = load("preference_messages.jsonl")
    assert [x["role"] for x in m["prompt"]] == ["user", "assistant", "user"]
    assert m["rejected"] == [{"role": "assistant", "content": "No."}]
    assert formats.kind_of(m) == "preference"


def test_hh_rlhf_shared_prompt_and_final_reply():
    _, (r,) = load("hh_rlhf.jsonl")
    assert [m["role"] for m in r["prompt"]] == ["user", "assistant", "user"]
    assert r["prompt"][-1]["content"] == "Soft or hard?"
    assert r["chosen"][0]["content"].startswith("Eight minutes")
    assert r["rejected"] == [{"role": "assistant", "content": "Whatever."}]


def test_kto_labels_from_csv():
    _, (a, b) = load("kto.csv")
    assert a["label"] is True and b["label"] is False
    assert a["completion"] == [{"role": "assistant", "content": "A cat sat on a mat."}]
    assert a["origin"].endswith("kto.csv:2")


def test_prompt_only_with_gold():
    _, (a, b) = load("prompt_only.jsonl")
    assert a == {"prompt": [{"role": "user", "content": "What is 6*7?"}], "answer": "42", "origin": a["origin"]}
    assert b["prompt"][0]["role"] == "system" and b["answer"] == "5"
    assert formats.kind_of(a) == "prompt"
    # prompt beside messages (as in UltraChat) is a conversation, not a prompt-only row
    rows = [Row({"prompt": "hi", "prompt_id": "x", "messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "hello"}]}, "u:1")]
    assert formats.normalize_rows(rows, "auto", "u")[0] == "messages"


def test_columns_map_custom_names():
    rows = [Row({"q": "Why?", "a": "Because."}, "x:1")]
    name, (rec,) = formats.normalize_rows(rows, "auto", "x", {"q": "question", "a": "answer"})
    assert name == "qa" and rec["messages"][1]["content"] == "Because."


def test_qa_normalize_still_callable_directly():
    rec = formats.FORMATS["qa"].normalize(Row({"question": "1+1?", "answer": "2\n#### 2"}, "shot 0"))
    assert rec["messages"][0]["content"] == "1+1?" and rec["answer"] == "2"


# ---------------------------------------------------------------------------------------------------- error paths

def err(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(UserError) as e:
        formats.normalize_rows(read_source(str(path)), fmt, str(path))
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_unknown_format_lists_fields_and_near_matches():
    msg = err(DATA / "errors" / "unknown.jsonl")
    assert "unknown.jsonl:1" in msg and "['id', 'instruction_text', 'reply']" in msg
    assert "data.format" in msg and "data.columns" in msg


def test_near_match_named():
    rows = [Row({"instruction": "a", "answer": "b"}, "f.jsonl:1")]
    with pytest.raises(UserError, match=r"alpaca \(missing output\).*dolly \(missing response\)"):
        formats.normalize_rows(rows, "auto", "f.jsonl")


def test_ambiguous_format():
    msg = err(DATA / "errors" / "ambiguous.jsonl")
    assert "fit several formats (messages, sharegpt)" in msg and "ambiguous.jsonl:1" in msg


def test_unknown_explicit_format_suggests():
    with pytest.raises(UserError, match="did you mean 'sharegpt'"):
        formats.resolve_format("sharegtp")


@pytest.mark.parametrize("fixture, fragment", [
    ("wrong_type.jsonl", "wrong_type.jsonl:2: 'question' must be text, got int"),
    ("empty_content.jsonl", "empty_content.jsonl:2: messages[1] (assistant) has empty content"),
    ("missing_field.jsonl", "missing_field.jsonl:2: missing field(s) output for format 'alpaca'"),
    ("role_order.jsonl", "role_order.jsonl:2: messages: two 'user' messages in a row"),
    ("identical_pair.jsonl", "identical_pair.jsonl:1: 'chosen' and 'rejected' are identical"),
    ("bad_label.csv", "bad_label.csv:3: 'label' must be true/false"),
])
def test_invalid_rows_named_by_file_and_line(fixture, fragment):
    assert fragment in err(DATA / "errors" / fixture)


def test_assistant_first_and_bad_role():
    rows = [Row({"messages": [{"role": "assistant", "content": "hi"}]}, "a.jsonl:4")]
    with pytest.raises(UserError, match="a.jsonl:4: messages: the first non-system message must be from the user"):
        formats.normalize_rows(rows, "messages", "a.jsonl")
    rows = [Row({"messages": [{"role": "usr", "content": "hi"}]}, "a.jsonl:5")]
    with pytest.raises(UserError, match="a.jsonl:5: messages\\[0\\] has role 'usr' \\(did you mean 'user'\\?\\)"):
        formats.normalize_rows(rows, "messages", "a.jsonl")


def test_hh_pair_diverging_early_is_rejected():
    rows = [Row({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                 "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e"}, "hh.jsonl:9")]
    with pytest.raises(UserError, match="hh.jsonl:9: 'chosen' and 'rejected' differ before the final assistant"):
        formats.normalize_rows(rows, "auto", "hh.jsonl")


def test_problems_collected_instead_of_raised():
    path = DATA / "errors" / "role_order.jsonl"
    problems: list[str] = []
    _, recs = formats.normalize_rows(read_source(str(path)), "auto", str(path), problems=problems)
    assert len(recs) == 1 and len(problems) == 1 and "role_order.jsonl:2" in problems[0]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.mark.parametrize("first, fragment", [
    ({"text": 5}, "missing field(s) messages for format 'messages' (fields here: text;"),
    ({"massages": _chat("a", "b")["messages"]}, "(fields here: massages; 'massages': did you mean 'messages'?;"),
])
def test_a_bad_first_row_is_one_invalid_row_not_the_files_format(tmp_path, first, fragment):
    # the first row used to decide the format alone: one typo there made the whole file undetectable
    p = tmp_path / "chat.jsonl"
    rows = [first, _chat("1+1?", "2"), _chat("Hi", "Hello"), _chat("x", "y")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems: list[str] = []
    name, recs = formats.normalize_rows(read_source(str(p)), "auto", str(p), problems=problems)
    assert name == "messages" and [r["origin"] for r in recs] == [f"{p}:2", f"{p}:3", f"{p}:4"]
    assert len(problems) == 1 and problems[0].startswith(f"{p}:1: ") and fragment in problems[0]
    assert err(p).startswith(f"{p}:1: missing field(s) messages")  # refused by its own line without skip
    # alone in its file the row still cannot be detected, and says why its values do not fit
    p.write_text(json.dumps(first) + "\n")
    assert "could not detect the data format" in err(p)
    p.write_text(json.dumps({"text": 5}) + "\n")
    assert "nearly matched: text (values do not fit: 'text' must be text, got int)" in err(p)


def test_rows_split_evenly_between_formats_are_not_guessed(tmp_path):
    p = tmp_path / "mix.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" +
                 json.dumps({"instruction": "c", "response": "d"}) + "\n")
    assert err(p) == (f"{p}: its rows fit different formats equally often: alpaca (1 row, first {p}:1), dolly "
                      f"(1 row, first {p}:2); set data.format to one of them (rows of the others are then reported "
                      "as invalid)")


def test_qa_answer_object_without_value_names_its_type():
    rows = [Row({"question": "q", "answer": {"foo": "v"}}, "qa.jsonl:1")]
    with pytest.raises(UserError) as e:
        formats.normalize_rows(rows, "auto", "qa.jsonl")
    assert str(e.value).startswith("qa.jsonl:1: 'answer' is a dict without 'value' or 'aliases' (keys: foo)")
    for answer, fragment in ((None, "'answer' is empty or not text (got null)"), ([], "'answer' is an empty list"),
                             (["", "x"], "'answer' (its first entry) is empty or not text (got '')")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            formats.normalize_rows([Row({"question": "q", "answer": answer}, "qa.jsonl:2")], "qa", "qa.jsonl")


def test_csv_cell_that_is_broken_json_says_why(tmp_path):
    p = tmp_path / "chat.csv"
    whole = json.dumps(_chat("x", "y")["messages"])
    comma = whole.index(", {")
    for cell, why in ((whole[:30], "Unterminated string starting at character 30 of 30: is it cut short?"),
                      (whole[:comma], "Expecting ',' delimiter at the end of the cell: is it cut short?"),
                      (whole.replace(", {", " {"), f"Expecting ',' delimiter at character {comma + 2} of "
                                                   f"{len(whole) - 1}")):
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["messages"])
            w.writerow([json.dumps(_chat("2+2?", "4")["messages"])])
            w.writerow([cell])
        assert err(p) == (f"{p}:3: 'messages' must be a non-empty list of {{role, content}} objects; the cell could "
                          f"not be parsed as JSON ({why})")


# ------------------------------------------------------------------------------------ JSON-looking text, system

def test_json_looking_text_is_text_outside_csv(tmp_path):
    # in JSON Lines a string is the text itself: a reply that is a JSON document must stay a reply
    p = tmp_path / "extract.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Extract the name: Bob is 42.", "completion": '{"name": "Bob", "age": 42}'},
        {"prompt": "[note] List primes below 5.", "completion": "[2, 3]"}]))
    name, (a, b) = formats.normalize_rows(read_source(str(p)), "auto", str(p))
    assert name == "prompt_completion"
    assert a["messages"][1] == {"role": "assistant", "content": '{"name": "Bob", "age": 42}'}
    assert b["messages"] == [{"role": "user", "content": "[note] List primes below 5."},
                             {"role": "assistant", "content": "[2, 3]"}]
    # a qa answer that is a JSON list as text is the answer, not a list of aliases
    rows = [Row({"question": "Primes below 4 as JSON strings?", "answer": '["2", "3"]'}, "q.jsonl:1")]
    (rec,) = formats.normalize_rows(rows, "auto", "q.jsonl")[1]
    assert rec["answer"] == '["2", "3"]' and "aliases" not in rec
    rows = [Row({"prompt": "Name?", "chosen": '{"name": "Bob"}', "rejected": '{"name": "42"}'}, "p.jsonl:1")]
    (pair,) = formats.normalize_rows(rows, "auto", "p.jsonl")[1]
    assert pair["chosen"] == [{"role": "assistant", "content": '{"name": "Bob"}'}]


def test_csv_cells_carry_json_structure(tmp_path):
    p = tmp_path / "mixed.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "completion"])
        w.writerow([json.dumps([{"role": "user", "content": "Hi"}]),
                    json.dumps([{"role": "assistant", "content": "Yo"}])])
        w.writerow(["Extract the name: Bob.", '{"name": "Bob"}'])  # a JSON object that is not messages: text
    _, (a, b) = formats.normalize_rows(read_source(str(p)), "auto", str(p))
    assert a["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert b["messages"][1]["content"] == '{"name": "Bob"}'
    q = tmp_path / "qa.csv"
    q.write_text('question,answer\nCapital of France?,"[""Paris"", ""City of Light""]"\n')
    (rec,) = formats.normalize_rows(read_source(str(q)), "auto", str(q))[1]
    assert rec["answer"] == "Paris" and rec["aliases"] == ["Paris", "City of Light"]


def test_row_system_reaches_every_conversational_format():
    sys_msg = {"role": "system", "content": "You are a pirate."}
    rows = [Row({"system": "You are a pirate.", "prompt": "hi", "completion": "arr"}, "pc:1")]
    name, (pc,) = formats.normalize_rows(rows, "auto", "pc")
    assert name == "prompt_completion" and pc["messages"][0] == sys_msg
    rows = [Row({"system": "You are a pirate.", "prompt": "hi", "chosen": "arr", "rejected": "hello"}, "pr:1")]
    name, (pr,) = formats.normalize_rows(rows, "auto", "pr")
    assert name == "preference" and pr["prompt"] == [sys_msg, {"role": "user", "content": "hi"}]
    conv = [{"role": "user", "content": "hi"}]
    rows = [Row({"system": "You are a pirate.", "chosen": conv + [{"role": "assistant", "content": "arr"}],
                 "rejected": conv + [{"role": "assistant", "content": "hello"}]}, "pi:1")]
    assert formats.normalize_rows(rows, "auto", "pi")[1][0]["prompt"][0] == sys_msg
    rows = [Row({"system": "You are a pirate.", "prompt": "hi", "completion": "arr", "label": True}, "k:1")]
    name, (k,) = formats.normalize_rows(rows, "auto", "k")
    assert name == "kto" and k["prompt"][0] == sys_msg and k["label"] is True


def test_kto_float_labels():
    rows = [Row({"prompt": "a", "completion": "x", "label": 1.0}, "k:1"),
            Row({"prompt": "b", "completion": "y", "label": 0.0}, "k:2")]
    assert [r["label"] for r in formats.normalize_rows(rows, "kto", "k")[1]] == [True, False]
    with pytest.raises(UserError, match="k:3: 'label' must be true/false"):
        formats.normalize_rows([Row({"prompt": "c", "completion": "z", "label": 0.5}, "k:3")], "kto", "k")


# ------------------------------------------------------------------------ message weight, empty system, tool calls

def test_openai_message_weight_marks_context_turns():
    msgs = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris", "weight": 0},
            {"role": "user", "content": "More sarcastic?"}, {"role": "assistant", "content": "Paris, obviously.",
                                                              "weight": 1}]
    (rec,) = formats.normalize_rows([Row({"messages": msgs}, "w.jsonl:1")], "auto", "w.jsonl")[1]
    assert rec["messages"][1] == {"role": "assistant", "content": "Paris", "train": False}
    assert rec["messages"][3] == {"role": "assistant", "content": "Paris, obviously."}
    bad = [dict(m) for m in msgs]
    bad[1]["weight"] = 0.5
    with pytest.raises(UserError) as e:
        formats.normalize_rows([Row({"messages": bad}, "w.jsonl:2")], "auto", "w.jsonl")
    assert str(e.value) == ("w.jsonl:2: messages[1] has weight 0.5; a message weight is 0 (context, not trained) "
                            "or 1 (trained)")


def test_empty_system_message_is_dropped():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [Row({"messages": [{"role": "system", "content": ""}, *turns]}, "m:1"),
            Row({"conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "hi"},
                                   {"from": "gpt", "value": "yo"}]}, "s:1")]
    assert formats.normalize_rows(rows[:1], "auto", "m")[1][0]["messages"] == turns
    assert formats.normalize_rows(rows[1:], "auto", "s")[1][0]["messages"] == turns


@pytest.mark.parametrize("data", [
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]},
                  {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
    {"messages": [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}]},
    {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
                       {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
])
def test_tool_call_turns_are_refused_in_one_line(data):
    with pytest.raises(UserError) as e:
        formats.normalize_rows([Row(data, "t.jsonl:3")], "auto", "t.jsonl")
    msg = str(e.value)
    assert msg.startswith("t.jsonl:3: ") and "[1] is a tool-call turn; tool calls are not supported" in msg
    assert "remove" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------- values of the wrong kind

def test_lone_surrogate_is_named_and_skippable(tmp_path):
    p = tmp_path / "s.jsonl"
    bad = r'{"messages":[{"role":"user","content":"hi \ud800 there"},{"role":"assistant","content":"hello"}]}'
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    p.write_text(bad + "\n" + good + "\n")
    assert err(p).startswith(f"{p}:1: invalid unicode (a lone surrogate '\\ud800' after 'hi ')")
    problems: list[str] = []
    _, recs = formats.normalize_rows(read_source(str(p)), "auto", str(p), problems=problems)
    assert [r["origin"] for r in recs] == [f"{p}:2"] and problems[0].startswith(f"{p}:1: invalid unicode")


@pytest.mark.parametrize("data, fragment", [
    ({"question": "Capital of France?", "answer": {"aliases": "Paris"}}, "answer aliases must be a list of strings"),
    ({"question": "Capital of France?", "answer": {"value": "Paris", "aliases": {"Paris": 1}}},
     "answer aliases must be a list of strings, got dict"),
    ({"question": "Capital of France?", "answer": float("nan")}, "'answer' is empty or not text (got float)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                   {"role": "assistant", "content": "x"}]},
     "messages[0] (user) content part 0: a text part's 'text' must be a string, got NoneType"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "system": 5},
     "'system' must be text, got int"),
    ({"prompt": "2+2?", "answer": False}, "'answer' must be text or a number, got bool"),
])
def test_wrong_typed_values_are_refused_not_turned_into_text(data, fragment):
    with pytest.raises(UserError) as e:
        formats.normalize_rows([Row(data, "v.jsonl:2")], "auto", "v.jsonl")
    assert str(e.value).startswith("v.jsonl:2: ") and fragment in str(e.value)


def test_hh_transcript_without_assistant_turn():
    rows = [Row({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "hh.jsonl:1")]
    with pytest.raises(UserError, match="hh.jsonl:1: the 'chosen' transcript has no Assistant turn"):
        formats.normalize_rows(rows, "hh_rlhf", "hh.jsonl")
    rows = [Row({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?", "rejected": "\n\nHuman: hi\n\nAssistant: "
                 "no"}, "hh.jsonl:2")]
    with pytest.raises(UserError, match="hh.jsonl:2: the 'chosen' transcript ends with a Human turn"):
        formats.normalize_rows(rows, "hh_rlhf", "hh.jsonl")


def test_columns_map_renames_all_at_once():
    rows = [Row({"prompt": "Greet me.", "chosen": "go away", "rejected": "Hello!"}, "p.jsonl:1")]
    _, (rec,) = formats.normalize_rows(rows, "auto", "p.jsonl", {"chosen": "rejected", "rejected": "chosen"})
    assert rec["chosen"][0]["content"] == "Hello!" and rec["rejected"][0]["content"] == "go away"
    rows = [Row({"ask": "Why?", "question": "What?", "answer": "Because."}, "q.jsonl:3")]
    with pytest.raises(UserError, match=r"q.jsonl:3: data.columns gives field 'question' two values \(from fields "
                                        r"'ask' and 'question'\)"):
        formats.normalize_rows(rows, "auto", "q.jsonl", {"ask": "question"})
