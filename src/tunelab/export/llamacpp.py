"""llama.cpp through llama-cpp-python (optional: `pip install -e .[llamacpp]`, a source build of several minutes).

Used for CPU inference on a GGUF (`tunelab infer --gguf FILE`) and, when installed, as a second round-trip check of
every GGUF export: llama.cpp's own tokenizer and a greedy generation compared with transformers on the source model.

Chat prompts are always rendered with the chat template stored in the GGUF (through transformers' tokenizer rebuilt
from the file) and handed to llama.cpp as text with special tokens: llama-cpp-python's default chat handling produced
degenerate text for SmolLM2 while the same file answered correctly when the template was applied explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.errors import UserError

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


def generate(llm, ids: list[int], max_new_tokens: int, stream=None) -> list[int]:
    """Greedy tokens after `ids`, stopping at end-of-generation; `stream(text)` gets each piece as it comes."""
    out: list[int] = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == llm.token_eos() or len(out) >= max_new_tokens:
            break
        out.append(t)
        if stream:
            stream(llm.detokenize([t]).decode("utf-8", errors="ignore"))
    return out


def verify(path: Path, model, tok, qtype: str) -> bool:
    """llama.cpp's tokenization and greedy continuation vs transformers on the source model (when installed)."""
    if not available():
        print("llama.cpp check: skipped (llama-cpp-python not installed; pip install -e '.[llamacpp]' to add it)")
        return True
    import torch

    from tunelab.export.common import TOKENIZER_TEXTS, print_table, prompt_ids

    llm = load(path, n_ctx=512)
    rows, ok = [], True
    for text in TOKENIZER_TEXTS:
        same = llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text)
        ok &= same
        rows.append([f"tokenize {text[:30]!r}", "yes" if same else "NO"])
    # Greedy agreement: the first token must match for 8-bit and wider types; later tokens may drift apart after a
    # near-tie, so they are reported, not gated. 4-bit types only report.
    for i, ids in enumerate(prompt_ids(tok)[:2]):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)[0, len(ids):].tolist()
        got = generate(llm, ids, GREEDY_TOKENS)
        agree = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        gated = qtype in ("f32", "f16", "bf16", "q8_0")
        first_ok = bool(ref) and bool(got) and ref[0] == got[0]
        ok &= first_ok or not gated
        rows.append([f"greedy prompt {i}", f"{agree}/{len(ref)} tokens agree" + ("" if first_ok or not gated
                                                                                    else " (first token differs)")])
    print_table("llama.cpp vs transformers:", ["check", "result"], rows)
    return ok


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
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            text = user
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            print(piece, end="", flush=True)

        generate(llm, ids, args.max_new_tokens, stream=show)
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
