"""What a frozen float32 base costs a LoRA step under bf16 autocast on CPU, against a bf16 base, per micro-batch size.

    python benchmarks/frozen_storage.py                                  # embedded SmolLM2-135M, 16 x 368 tokens
    python benchmarks/frozen_storage.py --batch 2 --length 256 --kinds lm

Autocast caches a bf16 copy only of weights that require grad, so each matmul over a frozen float32 weight casts it
again: a cost per pass over the weights, which a micro-batch of many tokens hides. tunelab's time estimate charges it
per FLOP (estimate_time.CPU_STORAGE_SLOWDOWN, fitted on small micro-batches); this measures it at a given size.
Each row: one forward + backward of LoRA r=16 (all linear layers), the best of --repeats after one warm-up, for a
sequence-classification head ("cls": a reward model) and a causal LM with full logits ("lm"); with --padded, that
share of each row's tokens is real and the rest is padding behind an attention mask. Printed last: float32 / bf16.
"""

from __future__ import annotations

import argparse
import time


def step_seconds(model_path: str, kind: str, dtype, batch: int, length: int, real: float, repeats: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="SEQ_CLS" if kind == "cls" else "CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(model.config.vocab_size, 40_000), (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if real < 1.0:  # lengths spread around `real` of the longest; the first row is the longest, as in a padded batch
        lengths = (torch.rand(batch, generator=gen) * 2 * real * length).long().clamp(8, length)
        lengths[0] = length
        for i, n in enumerate(lengths.tolist()):
            mask[i, n:] = 0
            ids[i, n:] = model.config.pad_token_id
    times = []
    for _ in range(repeats + 1):  # the first pays one-off warm-up (oneDNN kernel choice, allocations)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask).logits.float().mean()
        loss.backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model source (tunelab's forms)")
    p.add_argument("--batch", type=int, default=16, help="sequences per micro-batch (reward-hh: 8 pairs = 16)")
    p.add_argument("--length", type=int, default=368, help="tokens per sequence (padded length)")
    p.add_argument("--padded", type=float, default=1.0, help="share of real tokens (1: no padding)")
    p.add_argument("--kinds", default="cls,lm", help="cls (sequence classification), lm (causal LM)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import torch

    from tunelab import models

    path = models.resolve_source(a.model)
    print(f"# {a.model} | {a.batch} x {a.length} tokens, {a.padded:.0%} real | torch threads "
          f"{torch.get_num_threads()}")
    for kind in a.kinds.split(","):
        s = {str(dt).split(".")[1]: step_seconds(path, kind, dt, a.batch, a.length, a.padded, a.repeats)
             for dt in (torch.float32, torch.bfloat16)}
        print(f"{kind}: float32 base {s['float32']:.2f} s, bf16 base {s['bfloat16']:.2f} s per forward+backward: "
              f"float32 / bf16 {s['float32'] / s['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()
