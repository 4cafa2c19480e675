"""GRPO generation throughput: tunelab's rollout (adapter merged while sampling) vs plain TRL's generate path.

Both sides are TRL GRPOTrainers over the same LoRA-wrapped model, prompts, sampling settings and seed; only the
rollout differs (`method.generation: tunelab | trl`). Each side generates one generation batch per repeat (the
prompts repeated num_generations times), timed around the trainer's generation call; completion tokens per second
are compared. The last line is the ratio tunelab / TRL.

    OMP_NUM_THREADS=2 python benchmarks/grpo_generation.py                       # embedded SmolLM2-135M, CPU
    python benchmarks/grpo_generation.py --model unsloth/Llama-3.2-1B-Instruct --prompts 8 --generations 8
    # a model built from its config (random bf16 weights; lengths are fixed by min_new_tokens, so the rate is real)
    python benchmarks/grpo_generation.py --model config:benchmarks/models/llama-3.2-1b.json --prompts 8 --generations 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path


def make_trainer(model, tok, rows, a, generation: str, precision: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tunelab.methods.grpo import rollout

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts * a.generations,
                      num_generations=a.generations, max_completion_length=a.max_new_tokens, report_to="none",
                      bf16=precision == "bf16", use_cpu=not __import__("torch").cuda.is_available(),
                      # equal lengths on both sides: throughput, not how soon a random sample stops
                      generation_kwargs={"min_new_tokens": a.max_new_tokens}, seed=0)
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=tok,
                       rollout_func=rollout if generation == "tunelab" else None)


def timed(trainer, prompts, seed) -> tuple[float, int]:
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # the generation call of one GRPO step (TRL's trainer method; both paths go through it)
    _, completion_ids, *_ = trainer._generate(prompts)
    return time.perf_counter() - t0, sum(len(c) for c in completion_ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=2, help="distinct GSM8K questions per generation batch")
    p.add_argument("--generations", type=int, default=4, help="num_generations")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct", help="tokenizer of a config: model")
    a = p.parse_args()
    warnings.filterwarnings("ignore")

    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from tunelab import models
    from tunelab.data.sources import read_source

    transformers.utils.logging.set_verbosity_error()
    if a.model.startswith("config:"):
        from sft_throughput import model_from_config  # benchmarks/ is this script's directory

        a.model = model_from_config(a.model.removeprefix("config:"), Path(tempfile.mkdtemp()), a.tokenizer)
    precision = models.resolve_precision(a.precision)
    tok = models.load_tokenizer(a.model)
    base = AutoModelForCausalLM.from_pretrained(models.resolve_source(a.model), dtype=torch.float32)
    if torch.cuda.is_available():
        base = base.cuda()
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    questions = [r.data["question"] for r in read_source("bundled:gsm8k/train")][: a.prompts]
    rows = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    prompts = [r["prompt"] for r in rows for _ in range(a.generations)]
    sides = {name: make_trainer(model, tok, rows, a, name, precision) for name in ("tunelab", "trl")}
    for t in sides.values():
        timed(t, prompts[: a.generations], 0)  # warm-up
    results = {name: [0.0, 0] for name in sides}
    for r in range(a.repeats):  # interleaved, so load changes on a shared machine hit both sides alike
        for name, t in sides.items():
            secs, toks = timed(t, prompts, r)
            results[name][0] += secs
            results[name][1] += toks
    rate = {name: toks / secs for name, (secs, toks) in results.items()}
    print(json.dumps({"model": a.model, "precision": precision, "device": str(model.device),
                      "sequences_per_batch": len(prompts), "max_new_tokens": a.max_new_tokens,
                      "tokens_per_s": {k: round(v, 1) for k, v in rate.items()}}))
    print(f"tunelab / TRL generation tokens/s: {rate['tunelab'] / rate['trl']:.2f}x")


if __name__ == "__main__":
    main()
