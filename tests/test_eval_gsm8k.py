"""GSM8K evaluation: prompts, scoring, and (marked e2e) the embedded model on 20 test questions."""

import pytest

from tunelab.data.sources import read_source
from tunelab.evaluation import gsm8k


def test_zero_shot_prompt_is_the_bare_question():
    rows = [{"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}]
    assert gsm8k.conversations(rows) == [[{"role": "user", "content": "What is 2+2?"}]]


def test_k_shot_uses_solved_train_examples_as_prior_turns():
    rows = [{"question": "Q?", "answer": "#### 1"}]
    conv = gsm8k.conversations(rows, k_shot=2)[0]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant", "user"]
    assert "####" in conv[1]["content"] and "<<" not in conv[1]["content"]  # calculator annotations stripped
    assert conv[-1]["content"] == "Q?"


def test_evaluate_tiny_model(tiny_model):
    from tunelab.models import load_for_inference

    model, tok = load_for_inference(tiny_model)
    rows = [r.data for r in read_source("bundled:gsm8k/test")[:3]]
    res = gsm8k.evaluate(model, tok, rows, k_shot=1, batch_size=3, max_new_tokens=8)
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0
    ex = res["examples"][0]
    assert set(ex) == {"question", "gold", "output", "pred", "correct", "formatted"}
    assert ex["gold"] == "18" and ex["question"] == rows[0]["question"]


@pytest.mark.e2e
def test_embedded_model_on_10_gsm8k_questions(embedded_model):
    from tunelab.models import load_for_inference

    model, tok = load_for_inference(embedded_model)
    rows = [r.data for r in read_source("bundled:gsm8k/test")[:10]]
    res = gsm8k.evaluate(model, tok, rows, batch_size=10, max_new_tokens=200)
    print(f"\nembedded SmolLM2-135M zero-shot GSM8K (10): accuracy={res['accuracy']:.2f} "
          f"format={res['format_rate']:.2f}")
    assert res["n"] == 10
    assert all(ex["output"].strip() for ex in res["examples"])  # it answers every question
    assert sum(ex["pred"] is not None for ex in res["examples"]) >= 7  # and states a number nearly always
