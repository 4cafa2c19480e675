"""One generation engine for eval, chat, the API server and the web UI.

Batched generation with the KV cache (transformers `generate`), left padding so every prompt ends where its reply
starts, prompts sorted by token length so a batch holds prompts of similar length, and stopping on EOS / end-of-turn
tokens and on stop strings. transformers' `generate` keeps a finished row in its batch until every row has finished
(it only overwrites the row's new tokens with padding), so a batch costs as much as its longest reply: `complete`
generates in chunks of CHUNK_TOKENS instead and drops the finished rows, from the batch and from its KV cache, between
chunks. `evaluation_model` gives batch evaluation a bf16 copy of the model on CPUs that run bf16 natively. `complete` returns text with token counts and
why it stopped (what the API reports as usage and finish_reason); `TextStream` yields a reply piece by piece while
`generate` runs on a worker thread, and can be cancelled (a client that went away, Ctrl-C in the terminal).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tunelab.rollout import left_pad, stop_token_ids  # noqa: F401  (stop_token_ids: used by callers of the engine)


@dataclass
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    # torch's global RNG: reproducible when one generation runs at a time (the terminal chat, eval, the UI).
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # token id -> bias added to its logit before sampling (OpenAI's logit_bias; -100 all but bans a token)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Batch evaluation only (`evaluation_model`): "auto" generates with a bf16 copy of the model, adapters merged, on
    # a CPU with native bf16 (greedy text can then differ from float32 in a few samples); "model" uses the model as
    # it was loaded. Chat, the server and the UI always use the model as loaded.
    precision: str = "auto"


# New tokens generated between two looks at which rows have finished. Each chunk is one `generate` call continuing
# from the batch's KV cache (a few ms of set-up); a shorter chunk drops finished rows sooner.
CHUNK_TOKENS = 32


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) | "length" (max_new_tokens reached)


def chat_prompts(tok, conversations: list[list[dict]]) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def context_length(model, tok) -> int:
    """How many tokens (prompt + reply) the model can attend to: its positions (models.context_length; GPT-2's are
    n_positions), narrowed by a limit its tokenizer records."""
    from tunelab.models import context_length as positions

    n = positions(model.config)
    tok_max = getattr(tok, "model_max_length", None)
    # Tokenizers without a recorded limit report a huge sentinel (1e30); only a real value narrows the model's.
    if isinstance(tok_max, int) and tok_max < 10**7:
        n = min(n, tok_max) if n else tok_max
    return int(n or 2048)


# A prompt is text, or token ids fed as they are (an API client's pre-tokenized prompt: nothing is added or decoded).
Prompt = str | list[int]


def encode(tok, prompts: list[Prompt], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each prompt: text tokenized (all in one call), token ids kept as they are."""
    texts = [p for p in prompts if isinstance(p, str)]
    tokenized = iter(tok(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else [])
    return [next(tokenized) if isinstance(p, str) else list(p) for p in prompts]


def count_tokens(tok, text: Prompt, add_special_tokens: bool = False) -> int:
    """Tokens of `text` as the engine feeds it: `add_special_tokens` as given to `complete` / `TextStream`."""
    return len(encode(tok, [text], add_special_tokens)[0])


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = len(text)
    for s in stops:
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut], cut < len(text)


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _stop_criteria(tok, stops: list[str], prompt_width: int):
    """A StoppingCriteria that ends a row once the text it has generated (its tokens from `prompt_width` on) holds a
    stop string. transformers' StopStringCriteria matches the end of the whole sequence, prompt included, so a prompt
    ending in the start of a stop string ("...\nA" with stop "\nA:") stopped a reply at once; OpenAI and vLLM match
    in the generated text only. Decoding the row's whole reply each step (not a window of tokens) finds any stop
    string, one of characters the vocabulary lacks too, exactly as the final text is cut; it costs microseconds per
    row beside a forward pass.
    """
    import torch
    from transformers import StoppingCriteria

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, prompt_width:], skip_special_tokens=True)
            return torch.tensor([_cut_at_stop(t, stops)[1] for t in texts], dtype=torch.bool,
                                device=input_ids.device)

    return _StopStrings()


def _with_criteria(kw: dict, *criteria) -> dict:
    """`kw` with `criteria` added to its stopping criteria (a copy: the caller's kwargs stay as they were)."""
    from transformers import StoppingCriteriaList

    return {**kw, "stopping_criteria": StoppingCriteriaList([*kw.get("stopping_criteria", []), *criteria])}


def _gen_kwargs(tok, model, params: GenParams) -> dict:
    kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=stop_token_ids(tok, model),
              pad_token_id=tok.pad_token_id, use_cache=True)
    if params.temperature > 0:
        kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    else:
        # Greedy: clear the sampling knobs a checkpoint's generation_config may carry, or transformers warns.
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.logit_bias:
        # transformers' own processor: with one-token sequences it adds each bias to that token's logit, every step
        kw["sequence_bias"] = [[[t], float(b)] for t, b in params.logit_bias.items()]
    return kw


def _stops(params: GenParams) -> list[str]:
    # An empty stop string matches nowhere (as with OpenAI): dropped, rather than ending every reply at once.
    return [s for s in params.stop if s]


def _reply_ids(ids: list[int], eos: set[int], pad: int | None) -> tuple[list[int], bool]:
    """The generated ids up to and including the first EOS (True) or all of them (False), without right padding."""
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k + 1], True
    while ids and pad is not None and ids[-1] == pad:  # a row that stopped on a stop string, padded to the batch
        ids = ids[:-1]
    return ids, False


def _upto_stop(tok, ids: list[int], stops: list[str]) -> list[int]:
    """The shortest head of `ids` whose text holds a stop string: the tokens generated before the row was stopped.
    What follows it is the batch's padding, which `_reply_ids` cannot tell from an EOS when the pad token is EOS."""
    while ids and _cut_at_stop(tok.decode(ids[:-1], skip_special_tokens=True), stops)[1]:
        ids = ids[:-1]
    return ids


class Cancelled(Exception):
    """`complete` was cancelled through its `cancel` event before it finished."""


def _cancel_criteria(cancel: threading.Event):
    """A StoppingCriteria that ends `generate` at its next token once `cancel` is set (a client that went away)."""
    import torch
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Cancelled()


def _generate_rows(model, tok, ids: list[list[int]], kw: dict, max_new: int, eos: set[int], stops: list[str],
                   cancel: threading.Event | None) -> list[list[int]]:
    """New token ids of each prompt in one left-padded batch, generated CHUNK_TOKENS at a time: after each chunk the
    rows that hit EOS, a stop string or `max_new` leave the batch and the KV cache (`Cache.batch_select_indices`), so
    the next chunk computes only the rows still writing. Each chunk continues from the cache, which holds every
    position but the last token: `generate` feeds just the new positions. Greedy output equals one `generate` call's.
    """
    import torch

    input_ids, mask = left_pad(ids, tok.pad_token_id, model.device)
    if stops:
        # Every chunk continues the same left-padded prompts: each row's reply starts at this width in all of them.
        kw = _with_criteria(kw, _stop_criteria(tok, stops, input_ids.shape[1]))
    new: list[list[int]] = [[] for _ in ids]
    alive = list(range(len(ids)))
    cache: dict = {}  # the KV cache of the batch, under the keyword this transformers version names it
    pad = tok.pad_token_id
    while alive:
        step = min(CHUNK_TOKENS, max_new - len(new[alive[0]]))
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=step,
                                 return_dict_in_generate=True, **cache, **kw)
        if cancel is not None and cancel.is_set():
            raise Cancelled
        got = out.sequences[:, input_ids.shape[1]:]
        keep = []
        for j, row in enumerate(alive):
            t = got[j].tolist()
            new[row] += t
            done = (len(new[row]) >= max_new or any(x in eos for x in t) or len(t) < step
                    or (pad is not None and t and t[-1] == pad)  # stopped by a stop string, padded to the chunk
                    or (stops and _cut_at_stop(tok.decode(new[row], skip_special_tokens=True), stops)[1]))
            if not done:
                keep.append(j)
        if not keep:
            break
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name still works, with a warning)
        name = "cache" if "cache" in out else "past_key_values"
        cache = {name: out[name]}
        sequences = out.sequences
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], got.shape[1]))], dim=1)
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=sequences.device)
            cache[name].batch_select_indices(sel)
            sequences, mask = sequences[sel], mask[sel]
        input_ids = sequences
        alive = [alive[j] for j in keep]
    return new


def complete(model, tok, prompts: list[Prompt], params: GenParams | None = None, batch_size: int = 16,
             cancel: threading.Event | None = None, add_special_tokens: bool = False) -> list[Completion]:
    """Completions with usage and finish reason for prompt strings (or token ids), in input order.

    `add_special_tokens` False is for chat-templated prompts, whose template writes BOS itself; True tokenizes raw
    text as the tokenizer does by default (BOS first where the model has one), as text was tokenized for training.
    It does not apply to token ids, which are fed as given.
    Setting `cancel` (from another thread) stops generating at the next token and raises `Cancelled`: the server
    uses it for a request whose client has disconnected.
    """
    import torch

    params = params or GenParams()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    outs: list[Completion | None] = [None] * len(prompts)
    ids = encode(tok, list(prompts), add_special_tokens)
    # Longest prompts first (in tokens): batches of similar length waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    kw = _gen_kwargs(tok, model, params)
    kw.pop("max_new_tokens")
    eos, stops = set(kw["eos_token_id"]), _stops(params)
    if cancel is not None:
        kw = _with_criteria(kw, _cancel_criteria(cancel))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        new = _generate_rows(model, tok, [ids[i] for i in idx], kw, params.max_new_tokens, eos, stops, cancel)
        for j, i in enumerate(idx):
            reply, hit_eos = _reply_ids(new[j], eos, tok.pad_token_id)
            text, hit_stop = _cut_at_stop(tok.decode(reply, skip_special_tokens=True), stops)
            if hit_stop:
                reply = _upto_stop(tok, reply, stops)
            stopped = hit_eos or hit_stop or len(reply) < params.max_new_tokens
            outs[i] = Completion(text, len(ids[i]), len(reply), "stop" if stopped else "length")
    return outs  # type: ignore[return-value]


def evaluation_model(model, params: GenParams | None = None):
    """The model batch evaluation generates with: on a CPU with native bf16 (models.bf16_supported), a bf16 copy with
    LoRA-style adapters merged into it, unless `params.precision` is "model". Decoding reads every weight for each
    token and AMX/AVX512-BF16 cores multiply bf16 natively: SmolLM2-135M generated ~1.5x the tokens/s this way (see
    benchmarks/RESULTS.md), and a merged model skips the adapter's extra matmuls. The copy leaves the caller's model
    (a model being trained, too) untouched. Models that are quantized, on a GPU, already half precision, carry a
    prompt-learning adapter (nothing to merge) or are sharded by DeepSpeed ZeRO-3 (a copy would hold this process's
    shards only; its own hooks gather the weights in each forward) are used as they are.
    """
    import copy

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    from tunelab.models import bf16_supported

    if (params is not None and params.precision == "model") or is_deepspeed_zero3_enabled():
        return model
    params_ = list(model.parameters())
    if (not params_ or params_[0].device.type != "cpu" or getattr(model, "is_quantized", False)
            or getattr(model, "quantization_config", None) is not None
            or getattr(getattr(model, "config", None), "quantization_config", None) is not None
            or not any(p.dtype == torch.float32 for p in params_) or not bf16_supported()):
        return model
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(c.is_prompt_learning for c in peft_config.values()):
        return model
    fast = copy.deepcopy(model)
    if peft_config:
        fast = fast.merge_and_unload()
    return fast.to(torch.bfloat16).eval()


def generate(model, tok, prompts: list[str], params: GenParams | None = None, batch_size: int = 16) -> list[str]:
    """Completions for raw prompt strings (already chat-templated where needed), in input order."""
    return [c.text for c in complete(model, tok, prompts, params, batch_size)]


def chat(model, tok, conversations: list[list[dict]], params: GenParams | None = None, batch_size: int = 16):
    return generate(model, tok, chat_prompts(tok, conversations), params, batch_size)


class TextStream:
    """One completion generated on a worker thread and read piece by piece as it is produced.

    Iterate it for text pieces; afterwards `finish_reason`, `prompt_tokens` and `completion_tokens` are set.
    `cancel()` makes `generate` stop at the next token (a StoppingCriteria watching an event); `close()` cancels and
    waits for the worker, so the caller knows the model is free again (the server switches adapters only then).
    Stop strings are honoured across piece boundaries: text that might begin a stop string is held back until the
    next piece shows whether it does.
    """

    def __init__(self, model, tok, prompt: Prompt, params: GenParams | None = None, add_special_tokens: bool = False):
        import torch
        from transformers import TextIteratorStreamer

        self.params = params or GenParams()
        self._stops = _stops(self.params)
        self._cancel = threading.Event()
        # add_special_tokens: as in `complete` (False for a chat-templated prompt, True for raw text)
        input_ids = torch.tensor(encode(tok, [prompt], add_special_tokens), device=model.device)
        enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        self.prompt_tokens = int(input_ids.shape[1])
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._hit_stop = False
        self._streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = _gen_kwargs(tok, model, self.params)
        kw["streamer"] = self._streamer
        kw = _with_criteria(kw, _cancel_criteria(self._cancel),
                            *([_stop_criteria(tok, self._stops, self.prompt_tokens)] if self._stops else []))
        eos, pad = set(kw["eos_token_id"]), tok.pad_token_id
        if self.params.seed is not None:
            torch.manual_seed(self.params.seed)

        def run():
            try:
                with torch.inference_mode():
                    out = model.generate(**enc, **kw)
                ids, hit_eos = _reply_ids(out[0, self.prompt_tokens:].tolist(), eos, pad)
                self.completion_tokens = len(ids)
                self._hit_eos = hit_eos
            except BaseException as e:  # handed to the reader, which re-raises it in its own thread
                self.error = e
                self._streamer.end()

        self._hit_eos = False
        self._worker = threading.Thread(target=run, name="tunelab-generate", daemon=True)
        self._worker.start()

    def __iter__(self):
        stops = self._stops
        text, sent = "", 0
        for piece in self._streamer:
            text += piece
            if stops:
                head, hit = _cut_at_stop(text, stops)
                if hit:
                    self._hit_stop = True
                    if len(head) > sent:
                        yield head[sent:]
                    self.cancel()
                    break
                safe = len(text) - _partial_stop(text, stops)
            else:
                safe = len(text)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            # The streamer ended: generation is over. Text held back for a stop string that never came is the reply's.
            tail, self._hit_stop = _cut_at_stop(text, stops)
            if len(tail) > sent:
                yield tail[sent:]
        self.close()
        if self.error is not None:
            raise self.error
        stopped = self._hit_eos or self._hit_stop or self.completion_tokens < self.params.max_new_tokens
        self.finish_reason = "stop" if stopped else "length"

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stop generating (if still running) and wait until the model is no longer in use."""
        self._cancel.set()
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream(model, tok, prompt: str, params: GenParams | None = None):
    """Yield text pieces of one completion as they are generated; closing the generator stops the generation."""
    s = TextStream(model, tok, prompt, params)
    try:
        yield from s
    finally:
        s.close()
