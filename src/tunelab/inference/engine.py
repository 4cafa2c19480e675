"""One generation engine for eval, chat, the API server and the web UI.

Batched generation with the KV cache (transformers `generate`), left padding so every prompt ends where its reply
starts, and stopping on EOS / end-of-turn tokens and on stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def chat_prompts(tok, conversations: list[list[dict]]) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def stop_token_ids(tok, model) -> list[int]:
    ids = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(src)
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate(model, tok, prompts: list[str], params: GenParams | None = None, batch_size: int = 16) -> list[str]:
    """Completions for raw prompt strings (already chat-templated where needed), in input order."""
    import torch

    params = params or GenParams()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = [""] * len(prompts)
    # Longest prompts first: batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    eos = stop_token_ids(tok, model)
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                      use_cache=True)
            if params.temperature > 0:
                kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if params.stop:
                kw.update(stop_strings=params.stop, tokenizer=tok)
            with torch.inference_mode():
                out = model.generate(**enc, **kw)
            new = out[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                outs[i] = _cut_at_stop(tok.decode(new[j], skip_special_tokens=True), params.stop)
    finally:
        tok.padding_side = old_side
    return outs


def chat(model, tok, conversations: list[list[dict]], params: GenParams | None = None, batch_size: int = 16):
    return generate(model, tok, chat_prompts(tok, conversations), params, batch_size)


def stream(model, tok, prompt: str, params: GenParams | None = None):
    """Yield text pieces of one completion as they are generated (TextIteratorStreamer on a worker thread)."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    params = params or GenParams()
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=stop_token_ids(tok, model),
              pad_token_id=tok.pad_token_id, streamer=streamer)
    if params.temperature > 0:
        kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.seed is not None:
        torch.manual_seed(params.seed)

    def run():
        with torch.inference_mode():
            model.generate(**enc, **kw)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        if params.stop and any(s in text for s in params.stop):
            yield _cut_at_stop(piece, params.stop)
            break
        yield piece
    worker.join()
