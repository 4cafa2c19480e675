"""Named chat templates (model.chat_template: chatml, llama3, ...), the default for base models without one, and
GPT-2's pad = EOS trap: the EOS that ends a reply must stay trained through the loss mask and the collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import build_tiny_model
from tunelab.config import DataConfig
from tunelab.data import build, inspection, render, templates
from tunelab.errors import UserError
from tunelab.models import load_tokenizer

ASSETS = Path(__file__).parent / "assets"
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."}]


@pytest.fixture()
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A tiny GPT-2 whose tokenizer is GPT-2-like: no chat template, EOS = BOS = <|endoftext|>, no pad token."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token=None)
    cfg_path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
def test_each_template_trains_the_replies_and_their_end(tok, name):
    tok.chat_template = templates.text(name, tok)
    enc = render.encode_conversation(tok, CHAT)
    trained = tok.decode([t for t in enc.labels if t != render.IGNORE])
    assert "Hello." in trained and "4." in trained and "Be terse" not in trained and "2+2" not in trained
    end = templates.end_token(tok, name)
    assert trained.count(end) == 2  # each reply ends with its end-of-turn token, trained
    assert templates.single_token(tok, end) in render.end_of_turn_ids(tok)
    assert templates.identify(tok) == name and templates.describe(tok).startswith(name)


def test_missing_end_token_falls_back_to_eos_and_present_one_is_used(tok):
    # SmolLM2's tokenizer has no <|eot_id|>: llama3 ends the turn with its EOS instead of an untrained new token
    tok.chat_template = templates.resolve("llama3", tok)
    assert templates.end_token(tok, "llama3") == "<|im_end|>"
    assert "the tokenizer's EOS: it has no '<|eot_id|>' token" in templates.describe(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})  # a Llama 3 tokenizer has it
    tok.chat_template = templates.resolve("llama3", tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert templates.describe(tok) == "llama3: Llama 3 instruct; assistant turns end with '<|eot_id|>'"
    assert eot in render.end_of_turn_ids(tok) and eot in render.encode_conversation(tok, CHAT).labels


def test_chat_template_accepts_name_jinja_or_file(tok, tmp_path):
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert templates.resolve(jinja, tok) == jinja
    f = tmp_path / "t.jinja"
    f.write_text(jinja)
    assert templates.resolve(str(f), tok) == jinja
    with pytest.raises(UserError, match=r"^model.chat_template: 'chatm' is neither a built-in template \(chatml, "
                                        r"llama3, .*did you mean 'chatml'\?"):
        templates.resolve("chatm", tok)
    # a syntax error is the template's, named as such (not blamed on the first data row it cannot render)
    with pytest.raises(UserError, match=r"^model.chat_template: Jinja syntax error on line 1 of the template: "
                                        r"unexpected '}'"):
        templates.resolve("{% for m in messages %}{{ m.content }", tok)
    f.write_text("{% for m in messages %}\n{% generation %}{{ m.content }}{% endgeneration %}")
    with pytest.raises(UserError, match=rf"^model.chat_template \({f}\): Jinja syntax error on line 2 .*'endfor'"):
        templates.resolve(str(f), tok)
    f.write_text("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")
    assert "generation" in templates.resolve(str(f), tok)  # transformers' assistant-mask markers parse
    # a misspelt field renders as nothing: every turn would train empty; an empty file would fall back to alpaca
    f.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.contnt }}<|im_end|>\n{% endfor %}")
    with pytest.raises(UserError, match=rf"^model.chat_template \({f}\): a user/assistant exchange renders without "
                                        r"the text of its user and assistant message; .*message\['content'\]"):
        templates.resolve(str(f), tok)
    with pytest.raises(UserError, match=r"without the text of its assistant message"):
        templates.resolve("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
                          tok)
    f.write_text("\n")
    with pytest.raises(UserError, match=rf"^model.chat_template \({f}\): the file is empty"):
        templates.resolve(str(f), tok)
    # a template that refuses the exchange itself is left to the data layer, which names the row
    refusing = "{{ raise_exception('System message required') }}"
    assert templates.resolve(refusing, tok) == refusing


def test_model_template_kept_unless_one_is_chosen(tiny_model):
    own = load_tokenizer(tiny_model)
    assert "SmolLM" in own.chat_template and templates.identify(own) is None
    chosen = load_tokenizer(tiny_model, chat_template="gemma")
    assert templates.identify(chosen) == "gemma"


def test_base_model_gets_the_default_and_trains_eos_despite_pad_eos(base_model, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = load_tokenizer(base_model)
    assert templates.identify(tok) == templates.DEFAULT == "alpaca"
    assert tok.pad_token_id == tok.eos_token_id  # GPT-2's trap: the EOS that ends a reply is also the pad token
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in [("Say hi.", "Hi!"), ("Name a longer colour, please.", "Blue.")]))
    rows, _, stats = build.prepare_sft(DataConfig(train=str(data), cache=False, shuffle=False), tok)
    assert stats["template"].startswith("alpaca") and stats["eos_lost"] == 0
    assert tok.decode([t for t in rows[0]["labels"] if t != render.IGNORE]) == "Hi!<|endoftext|>"
    # the collator TRL's SFT uses pads labels with -100 by position, so each reply's EOS stays a target
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id
        assert (batch["labels"][i, n:] == render.IGNORE).all()


def test_tokenizer_without_template_renders_with_the_default(base_model):
    tok = AutoTokenizer.from_pretrained(base_model)  # loaded outside load_tokenizer: no template at all
    assert not tok.chat_template
    text = render.render(tok, CHAT[1:3])
    assert text == "### Instruction:\nHi?\n\n### Response:\nHello.<|endoftext|>"
    assert templates.describe(tok).startswith("none (rendered with the default 'alpaca'")


def test_inspect_names_the_template(base_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    cfg = DataConfig(train=str(data), cache=False)
    report = inspection.inspect(str(data), inspection.load_tokenizer(base_model), cfg)
    assert report["template"].startswith("alpaca: instruction/response")
    assert "[[Hello.<|endoftext|>]]" in report["first_sample"]["rendered"]
    chatml = inspection.inspect(str(data), inspection.load_tokenizer(base_model, chat_template="chatml"), cfg)
    assert chatml["template"].startswith("chatml") and chatml["template"].endswith("end with '<|im_end|>'")
