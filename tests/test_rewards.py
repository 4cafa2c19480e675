"""Reward library: many answer spellings, adversarial strings, message completions, specs and weights."""

import time

import pytest

from tunelab import rewards
from tunelab.errors import UserError


@pytest.mark.parametrize("completion,gold,expected", [
    ("5 + 3 = 8\n#### 8", "8", 1.0),
    ("#### 8", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 8", 1.0),  # gold as a raw GSM8K solution
    ("#### $1,080.00", "1080", 1.0),
    ("The answer is \\boxed{1,080}", "1080", 1.0),
    ("<reasoning>12*90</reasoning><answer>1080</answer>", "1080", 1.0),
    ("So she pays 18 dollars.", "18", 1.0),
    ("18.0", 18, 1.0),
    ("#### 17", "18", 0.0),
    ("#### 18 wait no #### 19", "18", 0.0),  # the last stated answer counts
    ("I don't know", "18", 0.0),
    ("", "18", 0.0),
    ("#### 18", None, 0.0),  # a row without a gold answer scores 0
    ([{"role": "assistant", "content": "#### 42"}], "42", 1.0),
    ({"role": "assistant", "content": "#### 42"}, "42", 1.0),
    ("18" * 1000, "18", 0.0),  # a wall of digits is not the answer
])
def test_gsm8k_correct(completion, gold, expected):
    assert rewards.gsm8k_correct([completion], answer=[gold]) == [expected]


def test_gsm8k_correct_needs_the_answer_column():
    with pytest.raises(UserError, match="'answer' column"):
        rewards.gsm8k_correct(["#### 1"], prompts=["q"])


def test_gsm8k_correct_batch_and_extra_kwargs():
    out = rewards.gsm8k_correct(["#### 1", "#### 2", "#### 3"], answer=["1", "5", "3"], prompts=["a", "b", "c"],
                                completion_ids=[[1], [2], [3]])
    assert out == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("completion,expected", [
    ("<reasoning>a</reasoning><answer>4</answer>", 1.0),
    ("  <reasoning>\nthink\n</reasoning>\n<answer>\n4\n</answer>\n", 1.0),
    ("solution\n#### 4", 1.0),
    ("<reasoning>a</reasoning><answer></answer>", 0.0),  # empty answer
    ("<answer>4</answer><reasoning>a</reasoning>", 0.0),  # wrong order
    ("prefix <reasoning>a</reasoning><answer>4</answer>", 0.0),  # text outside the blocks
    ("<reasoning>a</reasoning><answer>4</answer> trailing", 0.0),
    ("<reasoning><reasoning>a</reasoning><answer>4</answer>", 0.0),  # nested/duplicated tags
    ("<reasoning>a<answer>4</answer>", 0.0),
    ("the answer is 4", 0.0),
    ("#### four", 0.0),
    ("", 0.0),
    ([{"role": "assistant", "content": "#### 4"}], 1.0),
])
def test_format(completion, expected):
    assert rewards.format_reward([completion]) == [expected]
    assert rewards.format_reward.__name__ == "format"


def test_adversarial_strings_are_fast():
    nasty = ["<reasoning>" * 20000, "<reasoning>a</reasoning>" + "<answer>" * 20000, "#" * 100000,
             "\\boxed{" * 20000, "1," * 50000, "<reasoning>" + "a" * 90000 + "</reasoning><answer>" + "b" * 5000]
    start = time.perf_counter()
    rewards.gsm8k_correct(nasty, answer=["1"] * len(nasty))
    rewards.format_reward(nasty)
    rewards.length(nasty)
    assert time.perf_counter() - start < 3.0


def test_length():
    f = rewards.make_length(target=4)
    assert f(["a b c d", "a b", "", "a b c d e f g h i"]) == [1.0, 0.5, 0.0, 0.0]
    assert f.__name__ == "length"
    g = rewards.make_length(target=10, unit="chars", tolerance=20)
    assert g(["x" * 20]) == [0.5]
    with pytest.raises(UserError):
        rewards.make_length(target=0)


def test_build_rewards_builtins_weights_and_options():
    funcs, weights = rewards.build_rewards(["gsm8k_correct", {"name": "format", "weight": 0.5},
                                            {"name": "length", "target": 3, "weight": 0.1}])
    assert [f.__name__ for f in funcs] == ["gsm8k_correct", "format", "length"]
    assert weights == [1.0, 0.5, 0.1]
    assert funcs[2](["a b c"]) == [1.0]


def test_build_rewards_errors():
    with pytest.raises(UserError, match="did you mean 'format'"):
        rewards.build_rewards(["fromat"])
    with pytest.raises(UserError, match="takes no options"):
        rewards.build_rewards([{"name": "format", "target": 3}])
    with pytest.raises(UserError, match="weight must be a number"):
        rewards.build_rewards([{"name": "format", "weight": "high"}])
    with pytest.raises(UserError, match="cannot import"):
        rewards.build_rewards(["no_such_module_xyz:f"])
    with pytest.raises(UserError, match="no function"):
        rewards.build_rewards(["tunelab.rewards:nope"])
    with pytest.raises(UserError):
        rewards.build_rewards([])


def test_user_reward_from_file_and_module(tmp_path):
    import sys

    f = tmp_path / "my_rewards.py"
    f.write_text("def shout(completions, **kw):\n    return [float(c.isupper()) for c in completions]\n"
                 "def make_contains(word):\n"
                 "    def contains(completions, **kw):\n        return [float(word in c) for c in completions]\n"
                 "    return contains\n")
    funcs, weights = rewards.build_rewards([f"{f}:shout", {"name": f"{f}:make_contains", "word": "cat", "weight": 2}])
    assert funcs[0](["HI", "hi"]) == [1.0, 0.0]
    assert funcs[1](["a cat", "a dog"]) == [1.0, 0.0]
    assert weights == [1.0, 2.0]
    sys.path.insert(0, str(tmp_path))  # the user's module importable, as `pip install -e` would make it
    try:
        funcs, _ = rewards.build_rewards(["my_rewards:shout"])
    finally:
        sys.path.remove(str(tmp_path))
    assert funcs[0](["OK"]) == [1.0]
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="boom"):
        rewards.build_rewards([f"{bad}:f"])


def test_reward_model_scores_prompt_plus_completion(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from conftest import ASSETS

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    funcs, _ = rewards.build_rewards([{"name": "reward_model", "path": str(tmp_path), "batch_size": 2}])
    rm = funcs[0]
    assert rm.__name__ == "reward_model"
    plain = rm(["4", "five", "4"], prompts=["2+2=", "2+2=", "2+2="])
    assert len(plain) == 3 and plain[0] == pytest.approx(plain[2], abs=1e-5) and plain[0] != plain[1]
    conv = rm([[{"role": "assistant", "content": "4"}]], prompts=[[{"role": "user", "content": "2+2?"}]])
    assert isinstance(conv[0], float)
    with pytest.raises(UserError, match="not a model directory"):
        rewards.reward_model(str(tmp_path / "missing"))
