"""Evaluation generation throughput: tunelab's batch path vs plain `model.generate` on the same GSM8K prompts.

Every side answers the same zero-shot GSM8K questions greedily with the same stop tokens and `max_new_tokens`:

- plain, one prompt at a time: `model.generate` per question (float32 as loaded);
- plain, naive batches: the tokenizer left-pads `--batch-size` questions in input order, one `model.generate` each;
  a batch runs until its longest reply ends (finished rows keep being computed, padded);
- tunelab: what `tunelab eval` / the quickstart run (`evaluation.common.chat_with_progress`): batches of prompts of
  similar token length, generated in chunks that drop finished rows, on a bf16 copy of the model where the CPU
  runs bf16 natively (`engine.evaluation_model`);
- tunelab --precision model: the same without the bf16 copy, to show what the chunked batching alone gives.

Tokens counted are reply tokens up to and including the end-of-turn token (what the answers are made of), the same
rule for every side. Also printed: how many replies equal the one-at-a-time float32 ones, and the format rate and
accuracy each side scores (bf16 changes a few greedy replies). The last line is the ratio tunelab / the faster plain
side.

    OMP_NUM_THREADS=2 python benchmarks/eval_generation.py                  # embedded SmolLM2-135M, 24 questions
    python benchmarks/eval_generation.py --n 48 --batch-size 16 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import time
import warnings


def reply_tokens(ids: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k + 1]
    return ids


def plain(model, tok, prompts: list[str], kw: dict, batch_size: int, eos: set[int]) -> tuple[list[str], int, float]:
    import torch

    texts, tokens = [], 0
    t0 = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b: b + batch_size]
        tok.padding_side = "left"
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ids = reply_tokens(row, eos)
            tokens += len(ids)
            texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - t0


def tunelab_side(model, tok, prompts: list[str], batch_size: int, max_new: int, precision: str):
    """The path of evaluation.common.chat_with_progress (engine.evaluation_model, then engine.complete's sorted,
    chunked batches), called in one piece here for the exact reply token counts."""
    from tunelab.inference.engine import GenParams, complete, evaluation_model

    params = GenParams(max_new_tokens=max_new, precision=precision)
    t0 = time.perf_counter()
    gen_model = evaluation_model(model, params)
    done = complete(gen_model, tok, prompts, params, batch_size)
    seconds = time.perf_counter() - t0
    return [c.text for c in done], sum(c.completion_tokens for c in done), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--data", default="bundled:gsm8k/test", help="GSM8K rows (question/answer)")
    p.add_argument("--n", type=int, default=24, help="questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200)
    a = p.parse_args()
    warnings.filterwarnings("ignore")

    import platform

    import torch
    import transformers

    from tunelab.data.sources import read_source
    from tunelab.evaluation import gsm8k
    from tunelab.inference.engine import chat_prompts
    from tunelab.models import bf16_supported, load_for_inference
    from tunelab.rollout import stop_token_ids
    from tunelab.train import quiet_libraries

    quiet_libraries()
    rows = [r.data for r in read_source(a.data)][: a.n]
    golds = [gsm8k._question_gold(r)[1] for r in rows]
    convs = gsm8k.conversations(rows)
    model, tok = load_for_inference(a.model)
    prompts = chat_prompts(tok, convs)
    eos = set(stop_token_ids(tok, model))
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
              eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)
    print(f"# {a.model}, {len(rows)} GSM8K questions from {a.data}, greedy, max_new_tokens {a.max_new_tokens}, "
          f"batch {a.batch_size}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, bf16 CPU: {bf16_supported()}, {platform.processor() or platform.machine()}")
    sides = [
        ("plain generate, one prompt at a time", lambda: plain(model, tok, prompts, kw, 1, eos)),
        (f"plain generate, naive batches of {a.batch_size}", lambda: plain(model, tok, prompts, kw, a.batch_size, eos)),
        ("tunelab, --precision model (chunked batches only)",
         lambda: tunelab_side(model, tok, prompts, a.batch_size, a.max_new_tokens, "model")),
        ("tunelab (eval path)", lambda: tunelab_side(model, tok, prompts, a.batch_size, a.max_new_tokens, "auto")),
    ]
    results = {}
    reference = None
    print("| side | reply tokens | seconds | tokens/s | replies equal to one-at-a-time | format | accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, fn in sides:
        texts, tokens, seconds = fn()
        reference = reference or texts
        same = sum(x.strip() == y.strip() for x, y in zip(texts, reference))
        s = gsm8k.score(texts, golds)
        results[name] = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {same}/{len(texts)} | "
              f"{s['format_rate']:.0%} | {s['accuracy']:.0%} |", flush=True)
    best_plain = max(v for k, v in results.items() if k.startswith("plain"))
    print(f"ratio tunelab / faster plain generate: {results['tunelab (eval path)'] / best_plain:.2f}x")


if __name__ == "__main__":
    main()
