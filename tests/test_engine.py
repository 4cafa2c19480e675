"""The generation engine: batched generate with left padding, stop tokens and strings, usage, streaming, cancel."""

from __future__ import annotations

import time

import pytest

from tunelab.inference.engine import (GenParams, TextStream, _partial_stop, chat_prompts, complete, context_length,
                                      generate, stream)


@pytest.fixture(scope="module")
def lively(tiny_model):
    """The tiny model with its weights shaken up: a freshly initialised model repeats one token greedily, which
    would make stop-string and streaming checks vacuous; this one writes varied (nonsense) text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    return model, AutoTokenizer.from_pretrained(tiny_model)


PROMPTS = [[{"role": "user", "content": "Tell me a long story about a dragon and a knight."}],
           [{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]]


def test_batched_left_padding_matches_one_by_one(lively):
    model, tok = lively
    prompts = chat_prompts(tok, PROMPTS)
    params = GenParams(max_new_tokens=12)
    side = tok.padding_side
    batched = generate(model, tok, prompts, params, batch_size=3)
    single = [generate(model, tok, [p], params)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) == 3 and all(batched)
    assert tok.padding_side == side  # padding is done by the engine; the shared tokenizer is left alone


def test_usage_and_finish_reason(lively):
    model, tok = lively
    [c] = complete(model, tok, chat_prompts(tok, PROMPTS[:1]), GenParams(max_new_tokens=7))
    assert c.completion_tokens == 7 and c.finish_reason == "length"
    assert c.prompt_tokens == len(tok(chat_prompts(tok, PROMPTS[:1])[0], add_special_tokens=False)["input_ids"])


def test_stop_string_cuts_batch_and_stream_alike(lively):
    model, tok = lively
    prompt = chat_prompts(tok, PROMPTS[:1])[0]
    full = generate(model, tok, [prompt], GenParams(max_new_tokens=16))[0]
    words = full.split()
    assert len(words) > 4, full
    stop = words[3][:3]  # part of a word in the middle: it may fall across streamed pieces
    want = full[:full.index(stop)]
    [c] = complete(model, tok, [prompt], GenParams(max_new_tokens=16, stop=[stop]))
    assert c.text == want and c.finish_reason == "stop"
    s = TextStream(model, tok, prompt, GenParams(max_new_tokens=16, stop=[stop]))
    assert "".join(s) == want and s.finish_reason == "stop"


def test_stream_matches_generate(lively):
    model, tok = lively
    prompt = chat_prompts(tok, PROMPTS[2:])[0]
    params = GenParams(max_new_tokens=12)
    pieces = list(stream(model, tok, prompt, params))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, [prompt], params)[0]
    s = TextStream(model, tok, prompt, params)
    list(s)
    assert (s.completion_tokens, s.finish_reason) == (12, "length")


def test_sampling_is_reproducible_with_a_seed(lively):
    model, tok = lively
    prompt = chat_prompts(tok, PROMPTS[1:2])[0]
    params = GenParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, tok, [prompt], params) == generate(model, tok, [prompt], params)
    assert "".join(stream(model, tok, prompt, params)) == generate(model, tok, [prompt], params)[0]


def test_cancel_stops_generation_promptly(lively):
    model, tok = lively
    s = TextStream(model, tok, "Once upon a time", GenParams(max_new_tokens=400))
    next(iter(s))
    t = time.monotonic()
    s.close()
    assert time.monotonic() - t < 10
    assert not s._worker.is_alive() and s.completion_tokens < 400


def test_partial_stop_and_context_length(lively):
    assert _partial_stop("hello wor", ["world"]) == 3
    assert _partial_stop("hello", ["world"]) == 0
    assert _partial_stop("ab##", ["###", "#x"]) == 2
    model, tok = lively
    assert context_length(model, tok) == 512  # the tiny config's max_position_embeddings
