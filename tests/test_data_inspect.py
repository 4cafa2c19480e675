"""`tunelab data inspect` through the real CLI, and the real datasets under ../shared/data (marked `shared`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_data
from tunelab.cli import main
from tunelab.config import DataConfig

DATA = Path(__file__).parent / "assets" / "data"
FMT = DATA / "formats"
TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"


def run_json(capsys, *argv) -> dict:
    assert main(["data", "inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_report(capsys, tiny_model, tmp_path):
    rows = [json.loads(x) for x in (FMT / "messages.jsonl").read_text().splitlines()]
    p = tmp_path / "dup.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[1:]))  # one duplicate
    rep = run_json(capsys, p, "--model", tiny_model, "--max-length", 40)
    assert rep["format"] == "messages" and rep["kinds"] == {"conversation": 3}
    assert rep["template"] == ("the tokenizer's own (or model.chat_template Jinja); "
                               "assistant turns end with '<|im_end|>'")
    assert rep["rows"] == {"read": 3, "valid": 3, "invalid": 0, "duplicates": 1}
    t = rep["tokens"]
    assert t["measured"] == 3 and t["min"] <= t["median"] <= t["p95"] <= t["max"]
    assert t["overlong"] == 1 and t["max"] > 40  # the two-turn conversation
    assert sum(b["count"] for b in rep["histogram"]) == 3
    first = rep["first_sample"]
    assert first["origin"].endswith("dup.jsonl:1")
    # the two-turn conversation, over max_length: shown as training cuts it, its second reply gone
    assert "[[Paris.<|im_end|>\n]]" in first["rendered"] and "Rome" not in first["rendered"]
    assert first["tokens"] == 40 and first["overlong"] == (f"cut at data.max_length=40 of its {t['max']} tokens, "
                                                           "as training cuts it")
    assert first["rendered"].startswith("<|im_start|>system\nYou are terse.")
    whole = run_json(capsys, p, "--model", tiny_model)["first_sample"]
    assert "[[Rome.<|im_end|>\n]]" in whole["rendered"] and "overlong" not in whole
    warnings = " ".join(rep["warnings"])
    assert "1 exact duplicate" in warnings and "longer than max_length=40" in warnings
    # the one conversation without a system message gets SmolLM2's own
    assert "inserts its own system prompt into 2 conversation(s)" in warnings and "SmolLM" in warnings


def test_inspect_says_which_over_long_samples_lose_their_reply(capsys, tiny_model, tmp_path):
    """Truncation keeps the start: a sample whose prompt alone fills max_length has no reply left, and training
    drops it; inspect says so rather than only that the sample is long."""
    p = tmp_path / "long.jsonl"
    rows = [[{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 80}],
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    rep = run_json(capsys, p, "--model", tiny_model, "--max-length", 60)
    assert rep["tokens"]["overlong"] == 2 and rep["tokens"]["reply_cut_off"] == 1
    assert ("2 samples are longer than max_length=60 tokens (data.overlong=truncate); in 1 of them the cut leaves no "
            "reply to train, so training drops them") in rep["warnings"]


def test_inspect_text_output_highlights_trained_tokens(capsys, tiny_model):
    assert main(["data", "inspect", str(FMT / "qa_gsm8k.jsonl"), "--model", tiny_model]) == 0
    out = capsys.readouterr().out
    assert "qa" in out and "median" in out and "p95" in out
    assert "[[He has 3+4=7 apples." in out  # not a terminal: trained text in [[ ]]
    assert "warning: the chat template inserts its own system prompt" in out


def test_inspect_counts_invalid_rows_and_eos(capsys, tmp_path):
    rep = run_json(capsys, DATA / "errors" / "role_order.jsonl", "--model", TOKENIZER)
    assert rep["rows"]["invalid"] == 1 and "role_order.jsonl:2" in rep["invalid_examples"][0]
    assert any("1 invalid rows skipped" in w for w in rep["warnings"])
    # a template whose assistant turn has no end-of-turn token: EOS is never trained
    tok_dir = tmp_path / "tok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(tok_dir)
    rep = run_json(capsys, FMT / "messages.jsonl", "--model", tok_dir)
    assert any(w.startswith("EOS not trained in 2 samples") for w in rep["warnings"])
    assert not any("system prompt" in w for w in rep["warnings"])


def test_inspect_shows_weight_zero_turn_untrained(capsys, tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris", "weight": 0},
        {"role": "user", "content": "More sarcastic?"}, {"role": "assistant", "content": "Paris, obviously."}]}) + "\n")
    rendered = run_json(capsys, p, "--model", TOKENIZER)["first_sample"]["rendered"]
    assert "[[Paris, obviously.<|im_end|>\n]]" in rendered
    assert "assistant\nParis<|im_end|>" in rendered and "[[Paris<|im_end|>" not in rendered


def test_inspect_warns_of_fields_a_fallback_format_leaves_unread(capsys, tmp_path):
    p = tmp_path / "pr.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n")
    rep = run_json(capsys, p, "--model", TOKENIZER)
    assert rep["format"] == "prompt"
    # a prompt is shown as GRPO/PPO's rollout renders it: ending where the sampled reply begins
    assert rep["first_sample"]["rendered"].endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert any("leaves field(s) response" in w and "data.columns: {response: completion}" in w
               for w in rep["warnings"])


@pytest.mark.parametrize("argv, fragment", [
    (["errors/malformed.jsonl", "--strict"], "malformed.jsonl:3: malformed JSON"),
    (["errors/unknown.jsonl"], "could not detect the data format from fields ['id', 'instruction_text', 'reply']"),
    (["errors/ambiguous.jsonl"], "fit several formats (messages, sharegpt)"),
    (["missing.jsonl"], "data file not found"),
    (["formats/kto.csv", "--format", "kot"], "--format: unknown data format 'kot' (did you mean 'kto'?)"),
    (["formats/kto.csv", "--max-length", "4"], "--max-length: Input should be greater than 8"),
    (["formats/kto.csv", "--column", "nonsense"], "--column 'nonsense' is not yours=expected"),
    (["errors/wrong_type.jsonl", "--strict"], "wrong_type.jsonl:2: 'question' must be text, got int"),
])
def test_inspect_bad_input_is_one_line_exit_2(capsys, argv, fragment):
    argv = [str(DATA / argv[0]) if not argv[0].startswith("missing") else argv[0], *argv[1:]]
    code = main(["data", "inspect", *argv, "--model", str(TOKENIZER)])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_inspect_refuses_unreadable_rows_in_one_line(capsys, tmp_path):
    sur = tmp_path / "sur.jsonl"
    sur.write_text(r'{"messages":[{"role":"user","content":"hi \ud800 there"},{"role":"assistant","content":"hello"}]}'
                   "\n")
    py = tmp_path / "py.jsonl"
    py.write_text("{'instruction': 'a', 'output': 'b'}\n{'instruction': 'c', 'output': 'd'}\n")
    for path, fragment in ((sur, f"{sur}:1: invalid unicode (a lone surrogate"),
                           (py, f"{py}: no usable rows: all 2 rows are invalid; first: {py}:1: malformed JSON")):
        code = main(["data", "inspect", str(path), "--model", str(TOKENIZER)])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and "Traceback" not in err and err.count("\n") == 1


def test_inspect_describes_a_file_whose_first_row_is_bad(capsys, tmp_path):
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    p = tmp_path / "first_bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [{"massages": chat}, {"messages": chat}, {"messages": chat}]))
    rep = run_json(capsys, p, "--model", TOKENIZER)
    assert rep["format"] == "messages" and rep["rows"]["invalid"] == 1 and rep["rows"]["valid"] == 2
    assert rep["invalid_examples"][0].startswith(f"{p}:1: missing field(s) messages")
    assert "'massages': did you mean 'messages'?" in rep["invalid_examples"][0]
    assert main(["data", "inspect", str(p), "--model", str(TOKENIZER), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}:1: missing field(s) messages") and err.count("\n") == 1
    # pretty-printed objects in a .jsonl file: one line about the file, not one per line of it
    p.write_text("".join(json.dumps({"messages": chat}, indent=2) + "\n" for _ in range(3)))
    assert main(["data", "inspect", str(p), "--model", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {p}: pretty-printed JSON (3 objects over several lines each), not JSON Lines; write one "
                   "object per line, or rename the file first_bad.json\n")


def test_inspect_renders_with_the_runs_template_and_system_prompt(capsys, tiny_model):
    """--chat-template and --system-prompt show the data as a run with model.chat_template and data.system_prompt
    trains on it, not as the model's own template would render it."""
    rep = run_json(capsys, FMT / "qa_gsm8k.jsonl", "--model", tiny_model, "--chat-template", "alpaca",
                   "--system-prompt", "Answer with a number.")
    rendered = rep["first_sample"]["rendered"]
    assert "### Instruction:" in rendered and "<|im_start|>" not in rendered
    assert "Answer with a number." in rendered
    assert not any("inserts its own system prompt" in w for w in rep["warnings"])


def test_inspect_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--help"])
    out = capsys.readouterr().out
    assert "--model" in out and "--json" in out


# ------------------------------------------------------------------------------------------- real data (../shared)

@pytest.mark.shared
def test_real_hh_rlhf(capsys):
    from tunelab.data import build

    path = str(shared_data("hh-rlhf/harmless-base-test.jsonl.gz"))
    train, _, stats = build.prepare_preference(DataConfig(train=path, on_invalid="skip", shuffle=False))
    assert stats["formats"] == {path: "hh_rlhf"} and stats["rows_read"] == 2312
    # a handful of transcripts have empty or doubled turns; they are skipped, counted and named
    assert 0 < stats["invalid_skipped"] < 30 and len(train) == 2312 - stats["invalid_skipped"]
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in train)
    assert all(len(p["chosen"]) == 1 and p["chosen"][0]["role"] == "assistant" for p in train)
    rep = run_json(capsys, path, "--model", TOKENIZER, "--limit", 50)
    assert rep["format"] == "hh_rlhf" and rep["rows"]["read"] == 2312 and rep["tokens"]["measured"] == 50


@pytest.mark.shared
def test_real_dialogsum(capsys, tmp_path):
    from transformers import AutoTokenizer

    from tunelab.data import build

    path = str(shared_data("dialogsum/dev.jsonl"))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = DataConfig(train=path, subset=40, val_split=0.25, max_length=512, cache_dir=str(tmp_path))
    train, val, stats = build.prepare_sft(cfg, tok)
    assert stats["formats"] == {path: "dialogue_summary"} and len(train) + stats["dropped"] == 30 and len(val) == 10
    assert build.prepare_sft(cfg, tok)[2]["cache"] == "hit"
    prompts, _, _ = build.prepare_prompts(DataConfig(train=path, subset=5))
    assert all(p["answer"] and p["prompt"][-1]["content"].startswith("Summarize") for p in prompts)
    rep = run_json(capsys, path, "--model", TOKENIZER, "--limit", 30)
    assert rep["format"] == "dialogue_summary" and rep["rows"]["valid"] == 500
