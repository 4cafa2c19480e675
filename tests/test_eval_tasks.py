"""Summarization (ROUGE), perplexity and prompt-file tasks."""

import json
import math

import pytest

from tunelab.evaluation import perplexity, prompts, summarization
from tunelab.evaluation.common import load_records


def test_rouge_known_pairs():
    same = summarization.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    # pred: the cat was sit(ting) on the mat (7 tokens, stemmed); ref: the cat sat on the mat (6 tokens)
    # unigram overlap 5 -> F1 = 2*5/(7+6); bigram overlap 3 (the cat, on the, the mat) -> 2*3/(6+5); LCS 5
    s = summarization.rouge(["the cat was sitting on the mat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(10 / 13)
    assert s["rouge2"] == pytest.approx(6 / 11)
    assert s["rougeL"] == pytest.approx(10 / 13)
    none = summarization.rouge(["completely different words"], ["the cat sat"])
    assert none == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # the mean over pairs
    mean = summarization.rouge(["a b", "x y"], ["a b", "p q"])
    assert mean["rouge1"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from tunelab.models import load_for_inference

    return load_for_inference(tiny_model)


def test_summarization_on_dialogsum_rows(tiny, tmp_path):
    p = tmp_path / "dialogs.jsonl"
    p.write_text("\n".join(json.dumps({"dialogue": f"#Person1#: Hi {i}\n#Person2#: Hello.", "summary": f"They greet {i}."})
                           for i in range(3)) + "\n")
    records = load_records(str(p))
    assert records[0]["messages"][0]["content"].startswith("Summarize the following dialogue.")  # as in training
    res = summarization.evaluate(*tiny, records, batch_size=3, max_new_tokens=6)
    assert res["n"] == 3 and set(res) >= {"rouge1", "rouge2", "rougeL", "examples"}
    ex = res["examples"][0]
    assert ex["reference"] == "They greet 0." and "#Person1#: Hi 0" in ex["prompt"]
    assert ex["rougeL"] == pytest.approx(summarization.rouge([ex["output"]], [ex["reference"]])["rougeL"])


def test_perplexity_matches_the_models_own_loss(tiny, tiny_chat_data):
    import torch

    from tunelab.data.build import encode_record

    model, tok = tiny
    records = load_records(tiny_chat_data, n=4)
    res = perplexity.evaluate(model, tok, records, batch_size=3)
    assert res["n"] == 4 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    # the per-token mean over all assistant tokens equals HF's own loss computed sample by sample, token-weighted
    nll = tokens = 0.0
    for r in records:
        enc = encode_record(tok, r)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels]))
        n = sum(1 for x in enc.labels[1:] if x != -100)
        nll, tokens = nll + out.loss.item() * n, tokens + n
    assert res["tokens"] == tokens
    assert res["loss"] == pytest.approx(nll / tokens, rel=1e-4)


def test_perplexity_scores_within_the_models_positions_and_says_what_it_left_out(tiny, tiny_chat_data):
    """A sample longer than the model's 512 positions is cut there (it crashed a model with learned positions), and
    the samples left with nothing to score are counted in the result and its summary line, not dropped silently."""
    from tunelab.evaluation.main import summary_line

    model, tok = tiny
    records = load_records(tiny_chat_data, n=4)
    long_prompt = {"messages": [{"role": "user", "content": "word " * 700}, {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "word " * 700}]}
    unanswered = {"messages": [{"role": "user", "content": "Hello?"}]}
    res = perplexity.evaluate(model, tok, records + [long_prompt, long_reply, unanswered], batch_size=3)
    assert res["n"] == 5 and res["max_length"] == 512  # the long reply is scored up to position 512
    assert res["skipped"] == {"no_reply": 1, "reply_past_max_length": 1}
    assert summary_line("perplexity", res).endswith(
        "(not scored: 1 without an assistant reply, 1 with the reply past 512 tokens)")
    assert "skipped" not in perplexity.evaluate(model, tok, records, batch_size=3)


def test_prompts_file(tiny, tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("Tell me a joke.\nWhat is 2+2?\n")
    res = prompts.evaluate(*tiny, load_records(str(p)), max_new_tokens=5)
    assert [e["prompt"] for e in res["examples"]] == ["Tell me a joke.", "What is 2+2?"]
    assert all(isinstance(e["output"], str) for e in res["examples"])


@pytest.mark.shared
def test_summarization_on_real_dialogsum(tiny):
    from conftest import shared_data

    records = load_records(str(shared_data("dialogsum/dev.jsonl")), n=2)
    res = summarization.evaluate(*tiny, records, batch_size=2, max_new_tokens=4)
    assert res["n"] == 2 and res["examples"][0]["reference"].startswith("#Person2# has trouble breathing")
