"""Tokenized SFT rows (loss mask, over-long handling, text), the on-disk cache, and preference/KTO/prompt rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.config import DataConfig
from tunelab.data import build, cache, render
from tunelab.errors import UserError

ASSETS = Path(__file__).parent / "assets"
FMT = ASSETS / "data" / "formats"


@pytest.fixture()
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def write_chat(path: Path, n: int, reply: str = "Fine.") -> str:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"How are you, number {i}?"},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for i in range(n)))
    return str(path)


def test_sft_rows_train_only_the_reply_and_eos(tok, tmp_path):
    p = write_chat(tmp_path / "c.jsonl", 4)
    train, val, stats = build.prepare_sft(DataConfig(train=p, cache=False, val_split=0.25), tok)
    assert len(train) == 3 and len(val) == 1 and stats["samples"] == 3 and stats["cache"] == "off"
    row = train[0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != render.IGNORE]
    assert tok.decode(trained) == "Fine.<|im_end|>\n"
    assert tok.eos_token_id in trained


def test_text_records_train_every_token(tok):
    train, _, _ = build.prepare_sft(DataConfig(train=str(FMT / "text.txt"), cache=False, shuffle=False), tok)
    assert train[0]["labels"] == train[0]["input_ids"] and train[0]["input_ids"][-1] == tok.eos_token_id


def test_overlong_truncate_drop_error(tok, tmp_path):
    long_reply = "word " * 60
    p = tmp_path / "mix.jsonl"
    write_chat(p, 3)
    with open(p, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Long?"},
                                         {"role": "assistant", "content": long_reply}]}) + "\n")
    base = dict(train=str(p), max_length=48, cache=False, shuffle=False)
    _, _, stats = build.prepare_sft(DataConfig(**base, overlong="truncate"), tok)
    assert stats["truncated"] == 1 and stats["samples"] == 4
    _, _, stats = build.prepare_sft(DataConfig(**base, overlong="drop"), tok)
    assert stats["dropped"] == 1 and stats["samples"] == 3
    with pytest.raises(UserError, match=r"mix.jsonl:4: sample is longer than data.max_length=48"):
        build.prepare_sft(DataConfig(**base, overlong="error"), tok)


def test_validation_data_is_scored_on_the_tokens_training_learns(tok, tmp_path):
    """Plain text trains every token, a conversation its replies: validation data of the other kind would log an
    eval_loss the training loss cannot be compared with, refused naming the file and the fix. Conversations of
    another format (preference pairs: SFT learns the chosen reply) score the same tokens and are accepted."""
    chats = write_chat(tmp_path / "chats.jsonl", 4)
    text = str(FMT / "text.txt")
    with pytest.raises(UserError, match=rf"^{text}:1: data.validation is plain text \(every token trained\), "
                                        r"format text, but the training data is conversations"):
        build.prepare_sft(DataConfig(train=chats, validation=text, cache=False), tok)
    with pytest.raises(UserError, match=rf"^{chats}:1: data.validation is conversations .*training data is plain "
                                        r"text.*data.val_split holds out training rows"):
        build.prepare_sft(DataConfig(train=text, validation=chats, cache=False), tok)
    _, val, _ = build.prepare_sft(DataConfig(train=chats, validation=str(FMT / "preference_messages.jsonl"),
                                             cache=False), tok)
    assert val


def test_no_trainable_samples(tok, tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "Only a question"}]}) + "\n")
    with pytest.raises(UserError, match="no trainable samples"):
        build.prepare_sft(DataConfig(train=str(p), cache=False), tok)


def test_sft_on_kto_and_prompt_only_data(tok):
    train, _, stats = build.prepare_sft(DataConfig(train=str(FMT / "kto.csv"), cache=False), tok)
    assert len(train) == 1 and stats["undesirable"] == 1  # only the desirable completion is imitated
    with pytest.raises(UserError, match="prompt_only.jsonl:\\d+: the data is prompts without replies"):
        build.prepare_sft(DataConfig(train=str(FMT / "prompt_only.jsonl"), cache=False), tok)
    prompts, _, _ = build.prepare_prompts(DataConfig(train=str(FMT / "prompt_only.jsonl"), shuffle=False))
    assert [p["answer"] for p in prompts] == ["42", "5"]


def test_sft_on_kto_rows_all_undesirable_says_so(tok, tmp_path):
    p = tmp_path / "kf.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c", "label": False}) + "\n" for i in range(3)))
    with pytest.raises(UserError) as e:
        build.prepare_sft(DataConfig(train=str(p), cache=False), tok)
    assert "every row of the training data is labelled undesirable (KTO label false)" in str(e.value)
    assert "method kto" in str(e.value) and "over-long" not in str(e.value)


def test_stats_carry_a_printable_line_on_skipped_rows(tok, tmp_path):
    p = write_chat(tmp_path / "c.jsonl", 3)
    with open(p, "a") as f:
        f.write("{not json}\n")
    _, _, stats = build.prepare_sft(DataConfig(train=p, on_invalid="skip", cache=False), tok)
    assert stats["invalid_skipped"] == 1 and stats["invalid_examples"][0].startswith(f"{p}:4: malformed JSON")
    assert stats["invalid_summary"].startswith(f"1 of 4 rows were invalid and skipped (data.on_invalid: skip); "
                                               f"first: {p}:4: malformed JSON")
    assert build.prepare_sft(DataConfig(train=write_chat(tmp_path / "ok.jsonl", 2), cache=False),
                             tok)[2]["invalid_summary"] is None


def test_sft_on_prompt_response_data_names_the_unread_field(tok, tmp_path):
    # {"prompt", "response"} fits no reply-carrying format, so it reads as prompt-only and `response` is unread
    p = tmp_path / "pr.jsonl"
    p.write_text(json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n")
    with pytest.raises(UserError) as e:
        build.prepare_sft(DataConfig(train=str(p), cache=False), tok)
    msg = str(e.value)
    assert "the data is prompts without replies" in msg and "field(s) response unread" in msg
    assert "data.columns: {response: completion}" in msg and "\n" not in msg
    train, _, _ = build.prepare_sft(DataConfig(train=str(p), columns={"response": "completion"}, cache=False), tok)
    assert len(train) == 1


def test_weight_zero_assistant_turn_is_context_only(tok, tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris", "weight": 0},
        {"role": "user", "content": "More sarcastic?"},
        {"role": "assistant", "content": "Paris, obviously.", "weight": 1}]}) + "\n")
    (row,), _, _ = build.prepare_sft(DataConfig(train=str(p), cache=False), tok)
    trained = tok.decode([t for t in row["labels"] if t != render.IGNORE])
    assert "Paris, obviously." in trained and "Paris<|im_end|>" not in trained
    assert "<|im_end|>" in trained  # the trained turn still learns to stop
    # the weight-0 turn is still in the input the model sees
    assert "Paris<|im_end|>" in tok.decode(row["input_ids"])


# ------------------------------------------------------------------------------------------------------------ cache

def test_cache_reused_and_invalidated(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    write_chat(p, 6)
    cfg = DataConfig(train=str(p), cache_dir=str(tmp_path / "cache"), val_split=0.2)
    first = build.prepare_sft(cfg, tok)
    assert first[2]["cache"] == "built"
    files = list((tmp_path / "cache").glob("sft-*.json"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*.tmp"))  # written atomically, no leftovers

    again = build.prepare_sft(cfg, tok)
    assert again[2]["cache"] == "hit" and again[:2] == first[:2]

    write_chat(p, 6, reply="Great.")  # content change -> a new key
    changed = build.prepare_sft(cfg, tok)
    assert changed[2]["cache"] == "built" and changed[0] != first[0]

    tok.chat_template = tok.chat_template.replace("helpful AI assistant", "careful AI assistant")  # template change
    assert build.prepare_sft(cfg, tok)[2]["cache"] == "built"
    tok.add_tokens(["<extra_token_for_test>"])  # tokenizer change
    assert build.prepare_sft(cfg, tok)[2]["cache"] == "built"
    assert build.prepare_sft(cfg, tok)[2]["cache"] == "hit"

    cfg2 = cfg.model_copy(update={"max_length": 64})  # settings change
    assert build.prepare_sft(cfg2, tok)[2]["cache"] == "built"
    cfg3 = cfg.model_copy(update={"packing": True})  # applied by the trainer later: same rows, same cache
    assert build.prepare_sft(cfg3, tok)[2]["cache"] == "hit"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupted_cache_is_rebuilt(tok, tmp_path, damage):
    p = write_chat(tmp_path / "c.jsonl", 3)
    cfg = DataConfig(train=p, cache_dir=str(tmp_path / "cache"))
    rows = build.prepare_sft(cfg, tok)
    (f,) = (tmp_path / "cache").glob("sft-*.json")
    raw = f.read_bytes()
    f.write_bytes({"truncate": raw[: len(raw) // 2], "flip": raw[:-10] + b"9" + raw[-9:],
                   "garbage": b"\x00\xffnot a cache", "empty": b""}[damage])
    rebuilt = build.prepare_sft(cfg, tok)
    assert rebuilt[2]["cache"] == "rebuilt" and rebuilt[:2] == rows[:2]
    assert build.prepare_sft(cfg, tok)[2]["cache"] == "hit"


def test_cache_save_is_atomic(tmp_path):
    target = tmp_path / "x.json"
    cache.save(target, "k", {"a": [1, 2]})
    assert cache.load(target, "k") == ({"a": [1, 2]}, "hit")
    assert cache.load(target, "other-key")[1] == "corrupt"
    assert cache.load(tmp_path / "missing.json", "k") == (None, "miss")


# ------------------------------------------------------------------------------------- preference / KTO / prompts

def test_sft_on_preference_trains_only_the_chosen_reply(tok):
    train, _, _ = build.prepare_sft(DataConfig(train=str(FMT / "hh_rlhf.jsonl"), cache=False), tok)
    trained = [t for t, lab in zip(train[0]["input_ids"], train[0]["labels"]) if lab != render.IGNORE]
    assert tok.decode(trained) == "Eight minutes gives a hard-boiled egg; six gives a soft one.<|im_end|>\n"


def test_prepare_preference_conversational_rows(tok):
    cfg = DataConfig(train=[str(FMT / "preference_strings.jsonl"), str(FMT / "hh_rlhf.jsonl")], shuffle=False,
                     cache=False)
    train, val, stats = build.prepare_preference(cfg, tok)
    assert len(train) == 3 and val == [] and stats["samples"] == 3
    assert set(train[0]) == {"prompt", "chosen", "rejected"}
    assert train[0]["prompt"] == [{"role": "user", "content": "Write a greeting."}]
    with pytest.raises(UserError, match="needs preference"):
        build.prepare_preference(DataConfig(train=str(FMT / "qa_gsm8k.jsonl"), cache=False), tok)


def test_prepare_preference_overlong(tok):
    cfg = DataConfig(train=str(FMT / "hh_rlhf.jsonl"), max_length=20, overlong="drop", cache=False)
    with pytest.raises(UserError, match="no training samples left"):
        build.prepare_preference(cfg, tok)
    with pytest.raises(UserError, match=r"hh_rlhf.jsonl:1: sample is \d+ tokens, longer than data.max_length=20"):
        build.prepare_preference(cfg.model_copy(update={"overlong": "error"}), tok)


def test_prepare_kto_from_kto_and_pairs():
    train, _, _ = build.prepare_kto(DataConfig(train=str(FMT / "kto.csv"), shuffle=False))
    assert [r["label"] for r in train] == [True, False] and set(train[0]) == {"prompt", "completion", "label"}
    pairs, _, _ = build.prepare_kto(DataConfig(train=str(FMT / "preference_strings.jsonl"), shuffle=False))
    assert len(pairs) == 4 and [r["label"] for r in pairs[:2]] == [True, False]


def test_prepare_prompts_keep_gold_answers():
    train, _, _ = build.prepare_prompts(DataConfig(train=str(FMT / "qa_gsm8k.jsonl"), shuffle=False))
    assert train[0] == {"prompt": [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many does he "
                                                               "have?"}], "answer": "7"}
    trivia, _, _ = build.prepare_prompts(DataConfig(train=str(FMT / "qa_trivia.jsonl"), shuffle=False))
    assert trivia[0]["aliases"][:2] == ["Paris", "Paris, France"]
    summ, _, _ = build.prepare_prompts(DataConfig(train=str(FMT / "dialogue_summary.jsonl"), shuffle=False,
                                                  system_prompt="Be brief."))
    assert summ[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert summ[0]["answer"].startswith("#Person2#")
    with pytest.raises(UserError, match="needs prompt data"):
        build.prepare_prompts(DataConfig(train=str(FMT / "text.txt")))


# ------------------------------------------------------------------------------------------- cache of every kind

class CountingTokenizer:
    """Wraps a tokenizer and counts tokenizing calls, to show a cache hit does not tokenize at all."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.tok(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("prepare, source", [
    (build.prepare_sft, "messages.jsonl"),
    (build.prepare_preference, "hh_rlhf.jsonl"),
    (build.prepare_kto, "kto.csv"),
    (build.prepare_prompts, "qa_gsm8k.jsonl"),
])
def test_every_kind_is_cached(tok, tmp_path, prepare, source):
    cfg = DataConfig(train=str(FMT / source), cache_dir=str(tmp_path / "cache"), shuffle=False)
    counting = CountingTokenizer(tok)
    first = prepare(cfg, counting)
    assert first[2]["cache"] == "built" and counting.calls > 0
    counting.calls = 0
    again = prepare(cfg, counting)
    assert again[2]["cache"] == "hit" and counting.calls == 0 and again[:2] == first[:2]
    assert {k: v for k, v in again[2].items() if k != "cache"} == {k: v for k, v in first[2].items() if k != "cache"}


def test_kinds_do_not_share_cache_files(tok, tmp_path):
    # preference pairs feed SFT, DPO and KTO alike; each kind's rows differ, so each has its own key and file
    cfg = DataConfig(train=str(FMT / "hh_rlhf.jsonl"), cache_dir=str(tmp_path), shuffle=False)
    for prepare in (build.prepare_sft, build.prepare_preference, build.prepare_kto):
        assert prepare(cfg, tok)[2]["cache"] == "built"
    assert sorted(f.name.split("-")[0] for f in tmp_path.glob("*.json")) == ["kto", "preference", "sft"]


# ------------------------------------------------------------------------------------------------ end of turn

def test_eos_counts_and_check_end_of_turn(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    write_chat(p, 2)  # short replies: the end-of-turn token survives max_length=48
    with open(p, "a") as f:
        for _ in range(3):
            f.write(json.dumps({"messages": [{"role": "user", "content": "Long?"},
                                             {"role": "assistant", "content": "word " * 60}]}) + "\n")
    cfg = DataConfig(train=str(p), max_length=48, cache=False, shuffle=False)
    _, _, stats = build.prepare_sft(cfg, tok)
    assert (stats["eos_kept"], stats["eos_lost"], stats["eos_missing"]) == (2, 3, 0) and stats["length_p95"] > 48
    with pytest.raises(UserError, match=r"^data.max_length=48 cuts the end-of-turn token off 3 of 5 samples \(60%\)"
                                        rf".*set data.max_length to {stats['length_p95']} \(the 95th percentile"):
        build.check_end_of_turn(stats, cfg.max_length, allow_lost=False)
    warning = build.check_end_of_turn(stats, cfg.max_length, allow_lost=True)
    assert warning.startswith("data.max_length=48 cuts the end-of-turn token off 3 of 5") and "\n" not in warning
    # a minority losing it is a warning, none losing it is silent
    assert "1 of 4 samples" in build.check_end_of_turn({"eos_kept": 3, "eos_lost": 1, "length_p95": 40}, 32)
    assert build.check_end_of_turn(build.prepare_sft(cfg.model_copy(update={"max_length": 256}), tok)[2], 256) is None
    # a template that never ends the reply with EOS is not a max_length problem (the pre-flight refuses it)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    _, _, stats = build.prepare_sft(cfg.model_copy(update={"max_length": 256}), tok)
    assert stats["eos_missing"] == 5 and build.check_end_of_turn(stats, 256) is None


def test_preference_truncation_counts_lost_eos(tok):
    cfg = DataConfig(train=str(FMT / "hh_rlhf.jsonl"), max_length=20, overlong="truncate", cache=False)
    _, _, stats = build.prepare_preference(cfg, tok)
    assert stats["eos_lost"] == stats["truncated"] > 0 and stats["eos_kept"] == 0
    with pytest.raises(UserError, match="cuts the end-of-turn token off"):
        build.check_end_of_turn(stats, cfg.max_length)
    _, _, prompt_stats = build.prepare_prompts(DataConfig(train=str(FMT / "qa_gsm8k.jsonl"), cache=False), tok)
    assert "eos_lost" not in prompt_stats  # prompts end before the reply: nothing to lose
