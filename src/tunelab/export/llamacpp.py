"""llama.cpp through llama-cpp-python (optional: `pip install -e .[llamacpp]`, a source build of several minutes).

Used for CPU inference on a GGUF (`tunelab infer --gguf FILE`) and, when installed, as a second round-trip check of
every GGUF export: llama.cpp's own tokenizer and a greedy generation compared with transformers on the source model.

Chat prompts are always rendered with the chat template stored in the GGUF (through transformers' tokenizer rebuilt
from the file, the same Jinja renderer the training data went through) and handed to llama.cpp as text with special
tokens, and without a BOS of llama.cpp's own (training added none to a rendered chat: its template writes the BOS
where it has one), so what llama.cpp sees is exactly what the model was trained on.

llama.cpp logs every step of loading and quantizing a model (hundreds of lines for a K-quant); `quiet()` collects that
log instead and shows it only when asked or when the work fails.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.common import LLAMACPP_TYPES, TOLERANCE, trained_end_of_turn, trained_stop_ids

INSTALL_HINT = ("llama-cpp-python is not installed; install it with: pip install -e '.[llamacpp]' "
                "(or pip install llama-cpp-python; it compiles llama.cpp, several minutes)")
GREEDY_TOKENS = 16


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load(path: Path, n_ctx: int = 2048, threads: int | None = None):
    if not available():
        raise UserError(INSTALL_HINT)
    from llama_cpp import Llama

    if not Path(path).is_file():
        raise UserError(f"GGUF file {path} does not exist")
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)


# ggml's log levels (ggml.h): what `quiet` shows of the collected log when the work inside it fails
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5
_keep_alive: list = []  # a ctypes callback handed to llama.cpp must outlive its registration


@contextlib.contextmanager
def quiet(verbose: bool = False):
    """Collect llama.cpp's own log instead of printing it (`verbose`: print it to stderr as it comes); when the block
    fails, its warnings and errors go to stderr, as they say what went wrong. A no-op without llama-cpp-python.

    llama.cpp sends its log through one process-wide callback (`llama_log_set`). llama-cpp-python's own callback
    prints everything until a model is loaded with verbose=False and nothing but errors after that, so a quantization
    floods the terminal or, later in the same process, shows nothing even when asked. The block's Python output is
    untouched (this is not a file-descriptor redirect)."""
    if not available():
        yield
        return
    import ctypes
    import importlib

    import llama_cpp

    collected: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        piece = text.decode("utf-8", errors="replace")
        if verbose:
            print(piece, end="", file=sys.stderr, flush=True)
            return
        if level == _LOG_CONT and collected:  # a continuation of the previous line keeps its level
            level = collected[-1][0]
        collected.append((level, piece))

    _keep_alive.append(collect)
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    except BaseException:
        shown = "".join(text for level, text in collected if level in (_LOG_WARN, _LOG_ERROR)).strip()
        if shown:
            print("llama.cpp's log (warnings and errors):\n" + shown, file=sys.stderr)
        raise
    finally:
        # back to llama-cpp-python's own callback (which honours Llama(verbose=...)); ours is then released
        default = getattr(importlib.import_module("llama_cpp._logger"), "llama_log_callback", None)
        if default is not None:
            llama_cpp.llama_log_set(default, ctypes.c_void_p(0))
            _keep_alive.remove(collect)


def describe(path: Path) -> dict:
    """What a GGUF file holds, read with gguf's GGUFReader: tensors per GGML type (most used first), bits per weight
    over all tensors (as llama.cpp reports it), and the file size in bytes."""
    from collections import Counter

    import gguf

    tensors = gguf.GGUFReader(path).tensors
    types = Counter(t.tensor_type.name.lower() for t in tensors)
    elements = sum(int(t.n_elements) for t in tensors)
    return {"tensors": len(tensors), "types": dict(types.most_common()),
            "bits_per_weight": sum(int(t.n_bytes) for t in tensors) * 8 / max(elements, 1),
            "bytes": Path(path).stat().st_size}


def summary(path: Path, qtype: str) -> str:
    """One line on what an export made: `GGUF q4_k_m: 27 tensors (q5_0 9, f32 9, ...), 6.17 bits per weight, ...`."""
    d = describe(path)
    types = ", ".join(f"{name} {n}" for name, n in d["types"].items())
    line = (f"GGUF {qtype}: {d['tensors']} tensors ({types}), {d['bits_per_weight']:.2f} bits per weight, "
            f"{d['bytes'] / 2**20:.1f} MiB")
    if qtype in LLAMACPP_TYPES:  # llama.cpp's own quantizer made it: explain its fallbacks
        line += ("\n  llama.cpp's quantizer picks each tensor's type: 1-D tensors stay f32, some get a wider type, "
                 "and where a row is not a multiple of 256 values a K-quant falls back to a 32-value block type "
                 "(q4_K to q5_0, q5_K to q5_1, q6_K to q8_0, q2_K/q3_K to q4_0); --verbose shows its log")
    return line


def _vocab_type(llm) -> str:
    """llama.cpp's vocabulary type of a loaded model: "spm" (sentencepiece: Llama 2, Mistral), "bpe", ..."""
    import llama_cpp

    kind = llama_cpp.llama_vocab_type(llama_cpp.llama_model_get_vocab(llm.model))
    return {llama_cpp.LLAMA_VOCAB_TYPE_SPM: "spm", llama_cpp.LLAMA_VOCAB_TYPE_BPE: "bpe"}.get(kind, str(kind))


def is_stop(llm, token: int) -> bool:
    """True when llama.cpp ends generation on `token` (its end-of-generation set: EOS, end-of-turn tokens and the
    like, as read from the GGUF's metadata)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def generate(llm, ids: list[int], max_new_tokens: int, stream=None) -> tuple[list[int], bool]:
    """Greedy tokens after `ids` as transformers' generate returns them: up to and including the token on which
    llama.cpp stops, at most `max_new_tokens` in all. Returns (tokens, stopped on an end-of-generation token);
    `stream(text)` gets each piece of text as it comes (the stop token is not shown)."""
    out: list[int] = []
    if max_new_tokens <= 0:
        return out, False
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(t)
        if is_stop(llm, t):
            return out, True
        if stream:
            stream(llm.detokenize([t]).decode("utf-8", errors="ignore"))
        if len(out) >= max_new_tokens:
            break
    return out, False


@dataclass
class GreedyCheck:
    agree: int  # leading tokens that are the same on both sides, the stop token included
    total: int  # the longer of the two sequences
    ok: bool
    note: str  # what the table shows after "agree/total tokens agree"


def compare_greedy(ref: list[int], got: list[int], got_stopped: bool, stop_ids: set[int], gated: bool,
                   name=str, tie: bool = False) -> GreedyCheck:
    """Compare two greedy continuations of one prompt over the same span: transformers' `ref` (which ends with its
    stop token when it stopped) and llama.cpp's `got` (which ends with the token llama.cpp stopped on, if it did).

    Fails when llama.cpp does not stop where transformers stopped on the same tokens (a GGUF that does not declare the
    end-of-turn token never stops), or stops where transformers goes on; for `gated` types (8 bits and wider) also
    when the first token differs. After a differing token the two continue from different text, so the rest, and
    where each stops, is reported, not gated: a near-tie can flip a later token without anything being wrong.
    `name(id)` spells a token for the note. `tie`: llama.cpp's first token is within the type's logit tolerance of
    transformers' top one (a near-tie the file's rounding may flip; reported, not gated).
    """
    agree = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    ref_stopped = bool(ref) and ref[-1] in stop_ids
    problems = []
    first_differs = not (ref and got and ref[0] == got[0])
    if gated and first_differs and not tie:
        problems.append("first token differs")
    if ref_stopped and agree >= len(ref) and not (got_stopped and len(got) == len(ref)):
        problems.append(f"llama.cpp does not stop on {name(ref[-1])}, transformers does")
    if got_stopped and agree >= len(got) and not (ref_stopped and len(ref) == len(got)):
        problems.append(f"llama.cpp stops on {name(got[-1])}, transformers goes on")
    if problems:
        note = "; ".join(problems)
    elif first_differs and tie:
        note = "first token differs at a near-tie (within the type's logit tolerance)"
    elif ref_stopped and got_stopped and agree == len(ref) == len(got):
        note = f"both stop on {name(ref[-1])}"
    elif not ref_stopped and not got_stopped:
        note = "neither stops within the limit"
    else:
        note = (f"transformers {'stops on ' + name(ref[-1]) if ref_stopped else 'goes on'}, "
                f"llama.cpp {'stops on ' + name(got[-1]) if got_stopped else 'goes on'} (after the tokens differ)")
    return GreedyCheck(agree, max(len(ref), len(got)), not problems, note)


def near_tie(logits, top: int, other: int, tolerance: float) -> bool:
    """Whether token `other` is as likely as transformers' greedy choice `top` within a type's tolerance: its logit
    is less than `tolerance` x the logits' standard deviation below the top one (the scale common.TOLERANCE is
    relative to). A tiny random model has such near-ties; a trained one rarely does."""
    return float(logits[top] - logits[other]) <= tolerance * float(logits.float().std())


def verify(path: Path, model, tok, qtype: str) -> bool:
    """llama.cpp's tokenization and greedy continuation vs transformers on the source model (when installed)."""
    if not available():
        print("llama.cpp check: skipped (llama-cpp-python not installed; pip install -e '.[llamacpp]' to add it)")
        return True
    import torch

    from tunelab.export.common import CHAT_PROMPTS, TOKENIZER_TEXTS, print_table, prompt_ids
    from tunelab.export.chat_formats import llamacpp_ids

    llm = load(path, n_ctx=512)
    rows, ok = [], True
    spm = _vocab_type(llm) == "spm"
    for text in TOKENIZER_TEXTS:  # with the BOS / EOS the file tells llama.cpp to add (chat_formats.adds_bos)
        same = llm.tokenize(text.encode(), add_bos=True, special=True) == llamacpp_ids(tok, text)
        result = "yes" if same else "NO"
        if not same and spm and text[:1].isspace() and \
                llm.tokenize(text.lstrip().encode(), add_bos=True, special=True) == llamacpp_ids(tok, text.lstrip()):
            # llama.cpp's sentencepiece tokenizer puts its "▁" prefix before a leading space, where sentencepiece and
            # transformers let the space be the prefix: a Llama 2 / Mistral vocabulary always differs there, in
            # llama.cpp's own conversions too. Reported; the rest of the text must agree.
            same, result = True, "leading space only (llama.cpp's sentencepiece prefix); the rest agrees"
        ok &= same
        rows.append([f"tokenize {text[:30]!r}", result])
    if tok.chat_template:  # a rendered chat as `infer` hands it over: the ids training made of it
        text = tok.apply_chat_template(CHAT_PROMPTS[0], tokenize=False, add_generation_prompt=True)
        same = chat_ids(llm, text) == tok.encode(text, add_special_tokens=False)
        ok &= same
        rows.append(["tokenize a rendered chat", "yes" if same else "NO"])
    # The end-of-turn token (the token a trained assistant turn ends with: EOS, or the template's own such as chatml's
    # <|im_end|> over a base whose EOS is <|endoftext|>) must end generation in llama.cpp too, or every chat through
    # llama.cpp or Ollama runs on to the token limit.
    stop_ids = set(trained_stop_ids(tok, model))
    for tid in dict.fromkeys(t for t in (tok.eos_token_id, trained_end_of_turn(tok)) if t is not None):
        stops = is_stop(llm, tid)
        ok &= stops
        rows.append([f"end of turn {tok.convert_ids_to_tokens(tid)!r} ends generation", "yes" if stops else "NO"])
    # Greedy agreement over the same span on both sides (up to and including the stop token): the first token must
    # match for 8-bit and wider types (4-bit types only report it); see compare_greedy for what else is gated.
    gated = qtype in ("f32", "f16", "bf16", "q8_0")
    for i, ids in enumerate(prompt_ids(tok)[:2]):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 eos_token_id=sorted(stop_ids) or None,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)[0, len(ids):].tolist()
        got, stopped = generate(llm, ids, GREEDY_TOKENS)
        tie = False
        if ref and got and ref[0] != got[0]:
            with torch.no_grad():
                first = model(torch.tensor([ids])).logits[0, -1]
            tie = near_tie(first, ref[0], got[0], TOLERANCE[qtype])
        check = compare_greedy(ref, got, stopped, stop_ids, gated, name=lambda t: repr(tok.convert_ids_to_tokens(t)),
                               tie=tie)
        ok &= check.ok
        rows.append([f"greedy prompt {i}", f"{check.agree}/{check.total} tokens agree, {check.note}"])
    print_table("llama.cpp vs transformers:", ["check", "result"], rows)
    return ok


def chat_ids(llm, text: str) -> list[int]:
    """llama.cpp's ids of a rendered chat, as training tokenized it: the template writes BOS where it has one, so
    none is added (llama.cpp's own BOS would make a second, or one training never saw)."""
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def infer(args) -> int:
    """`tunelab infer --gguf FILE [--prompt TEXT]`: chat with a GGUF on the CPU through llama.cpp."""
    from transformers import AutoTokenizer

    path = Path(args.gguf)
    llm = load(path, n_ctx=args.n_ctx, threads=args.threads)
    # The template stored in the file, applied explicitly (see the module docstring for why).
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(user: str) -> str:
        history.append({"role": "user", "content": user})
        if tok.chat_template:
            ids = chat_ids(llm, tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True))
        else:  # plain text, with the BOS the file asks for (training put the tokenizer's before a `text` sample)
            ids = llm.tokenize(user.encode(), add_bos=True, special=True)
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            print(piece, end="", flush=True)

        generate(llm, ids, args.max_new_tokens, stream=show)  # the stop token is not streamed
        print()
        reply = "".join(pieces)
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt:
        answer(args.prompt)
        return 0
    print(f"chatting with {path.name} through llama.cpp (empty line or Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        answer(line.rstrip("\n"))
    return 0
