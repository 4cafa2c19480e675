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
    from types import SimpleNamespace

    from transformers import GPT2Config

    gpt2 = SimpleNamespace(config=GPT2Config(n_positions=256))  # GPT-2 names its positions n_positions
    assert context_length(gpt2, tok) == 256


def test_finished_rows_leave_the_batch_and_replies_match_plain_generate(lively, monkeypatch):
    """Rows that end early stop being computed (the batch of later forward passes shrinks) and every reply is
    exactly what plain `generate`, one prompt at a time, writes (float32, greedy)."""
    import copy

    import torch

    from tunelab.inference import engine

    model, tok = lively
    prompts = chat_prompts(tok, PROMPTS)
    plain = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        plain.append(out[0, enc["input_ids"].shape[1]:].tolist())
    # an end-of-turn token the first reply writes early and the others never: that row finishes first
    stop_tok = next(t for t in plain[0][2:8] if all(t not in r for r in plain[1:]))
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [tok.eos_token_id, stop_tok]
    cut = [r[:r.index(stop_tok) + 1] if stop_tok in r else r for r in plain]
    sizes = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    monkeypatch.setattr(engine, "CHUNK_TOKENS", 4)
    got = complete(m, tok, prompts, GenParams(max_new_tokens=20), batch_size=3)
    assert [c.text for c in got] == [tok.decode(r, skip_special_tokens=True) for r in cut]
    assert got[0].finish_reason == "stop" and got[0].completion_tokens == len(cut[0]) < 20
    assert [c.completion_tokens for c in got[1:]] == [20, 20]
    assert sizes[0] == 3 and sizes[-1] == 2  # the finished row was dropped for the rest of the batch's chunks


def test_evaluation_model_is_a_merged_bf16_copy_on_bf16_cpus(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import make_adapter
    from tunelab.inference.engine import evaluation_model
    from tunelab.models import bf16_supported

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model = PeftModel.from_pretrained(base, make_adapter(tiny_model, tmp_path / "a", seed=1)).eval()
    assert evaluation_model(model, GenParams(precision="model")) is model
    fast = evaluation_model(model)
    if not bf16_supported():
        assert fast is model
        pytest.skip("this CPU has no native bf16: evaluation uses the model as loaded")
    assert fast is not model and not hasattr(fast, "peft_config")  # adapters merged into a plain model
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's model is untouched
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.inference_mode():
        want, got = model(ids).logits, fast(ids).logits.float()
    # bf16 keeps ~3 significant digits: close to the float32 logits of base + adapter, not equal to them
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item())


def test_stop_string_is_matched_in_the_reply_only(lively):
    """A prompt ending in the start of a stop string does not stop the reply at once: as with OpenAI and vLLM, stop
    strings are matched in the generated text, batched, streamed, and with an empty stop string (which matches
    nowhere) alike."""
    model, tok = lively
    prompts = ["Once upon a time", "The capital of France is"]
    params = GenParams(max_new_tokens=12)
    full = [c.text for c in complete(model, tok, prompts, params)]
    # the end of the first prompt followed by the start of its reply: found only across the boundary
    stop = prompts[0][-4:] + full[0][:2]
    assert stop not in full[0] and stop not in full[1], full
    got = complete(model, tok, prompts, GenParams(max_new_tokens=12, stop=[stop]))
    assert [c.text for c in got] == full
    assert [(c.completion_tokens, c.finish_reason) for c in got] == [(12, "length")] * 2
    s = TextStream(model, tok, prompts[0], GenParams(max_new_tokens=12, stop=[stop]))
    assert "".join(s) == full[0] and (s.completion_tokens, s.finish_reason) == (12, "length")
    assert [c.text for c in complete(model, tok, prompts, GenParams(max_new_tokens=12, stop=[""]))] == full
    s = TextStream(model, tok, prompts[0], GenParams(max_new_tokens=12, stop=[""]))
    assert "".join(s) == full[0] and s.completion_tokens == 12


def test_usage_of_a_row_stopped_by_a_stop_string_in_a_batch(lively):
    """A row that a stop string ends is padded while the rest of its batch goes on; with SmolLM2's tokenizer the pad
    token is the EOS token, and that padding is no token of the reply."""
    model, tok = lively
    assert tok.pad_token_id == tok.eos_token_id
    prompt, other = chat_prompts(tok, PROMPTS[:2])
    [plain] = complete(model, tok, [prompt], GenParams(max_new_tokens=16))
    plain_ids = tok(plain.text, add_special_tokens=False)["input_ids"]
    stop = plain.text.split()[3][:3]  # part of a word in the middle of the reply
    want = next(k for k in range(1, len(plain_ids) + 1)
                if stop in tok.decode(plain_ids[:k], skip_special_tokens=True))
    params = GenParams(max_new_tokens=16, stop=[stop])
    got = complete(model, tok, [prompt, other], params)
    s = TextStream(model, tok, prompt, params)
    text = "".join(s)
    assert got[0].text == text == plain.text[:plain.text.index(stop)] and got[0].finish_reason == "stop"
    assert got[0].completion_tokens == s.completion_tokens == want
    assert got[1] == complete(model, tok, [other], params)[0]  # the other row as it is alone


def test_raw_prompts_start_with_the_tokenizers_bos(lively):
    """add_special_tokens=True (raw text, the server's /v1/completions) feeds the model the tokenizer's BOS first and
    counts it as a prompt token; chat-templated prompts (the default) are fed as the template wrote them."""
    from transformers import AutoTokenizer

    model, _ = lively
    tok = AutoTokenizer.from_pretrained(model.name_or_path, add_bos_token=True)
    prompt = "Once upon a time"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == tok(prompt, add_special_tokens=False)["input_ids"]
    firsts = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: firsts.append(kw["input_ids"][:, 0].tolist()),
                                           with_kwargs=True)
    try:
        [c] = complete(model, tok, [prompt], GenParams(max_new_tokens=2), add_special_tokens=True)
        assert c.prompt_tokens == len(ids) and firsts[0] == [tok.bos_token_id]
        s = TextStream(model, tok, prompt, GenParams(max_new_tokens=2), add_special_tokens=True)
        list(s)
        assert s.prompt_tokens == len(ids) and firsts[-2] == [tok.bos_token_id]
        firsts.clear()
        [c] = complete(model, tok, [prompt], GenParams(max_new_tokens=2))
        assert c.prompt_tokens == len(ids) - 1 and firsts[0] == [ids[1]]
    finally:
        hook.remove()
