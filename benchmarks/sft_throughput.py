"""LoRA SFT throughput: plain TRL SFTTrainer (its defaults) vs tunelab's default path, in one process.

    python benchmarks/sft_throughput.py                      # embedded SmolLM2-135M, GSM8K rows, 6 steps x 8
    python benchmarks/sft_throughput.py --steps 10 --repeats 2 --model HuggingFaceTB/SmolLM2-360M-Instruct
    # GPU: a Llama-3.2-1B-shaped model built from its config (random weights, bf16), LoRA or QLoRA, tunelab's GPU
    # switches added to its side only
    # (each --tunelab is one more tunelab variant in the same run: here its defaults, then with Liger's kernels;
    # on a GPU quote the second repeat: the first run in a process pays CUDA/cuBLAS/Triton warm-up)
    python benchmarks/sft_throughput.py --model config:benchmarks/models/llama-3.2-1b.json --qlora --dropouts 0 \
        --steps 40 --batch-size 16 --repeats 2 --tunelab --tunelab method.use_liger_kernel=true

The realistic GPU table (Llama-3.2-1B and Llama-3.1-8B shapes, LoRA and QLoRA, FineTome-like multi-turn chat,
the seeds' shape and a throughput shape) is `benchmarks/gpu_suite.sh`; at tiny shapes on a CPU:

    python benchmarks/sft_throughput.py --model config:tiny --data chained --shape seed --steps 1 --repeats 1

`--data chained` chains GSM8K exchanges into multi-turn conversations of 300-2,000 tokens (lengths spread like
FineTome's: most short, a tail near the top); `--shape seed` is the seeds' batch 2 x accumulation 4 at max_length 2048,
`--shape throughput` batch 16 x 1 at 2048.

Both paths train LoRA r=16 (alpha 32, all-linear) on the same GSM8K rows (exactly one pass: steps x batch rows),
with the same learning rate and schedule, and run interleaved so a busy machine slows both alike. Each path runs
once per LoRA dropout in --dropouts: 0.05 is TRL's own LoRA default (`trl sft --use_peft`), 0 is PEFT's and
tunelab's. Plain TRL gets chat `messages` and SFTConfig's defaults otherwise (bf16, gradient checkpointing on,
padding to the longest in the batch, loss on every token: TRL's assistant-only loss refuses SmolLM2's template).
tunelab gets an equivalent config through `run_training` (its defaults: assistant-only loss, length-grouped
batches, lean loss and a bf16 frozen base on CPU, no gradient checkpointing).

Reported per run: real (non-pad) tokens/s of `train()`, the memory peak while training (CPU: resident memory sampled
every 20 ms, as the rise over the resident memory before the run and as the absolute peak; GPU: allocator peak), and
the loss after training on the same held-out rows (assistant tokens only, so both are scored on the same thing),
and MFU: model FLOPs per real token (tunelab.estimate's count for a frozen base with adapters; gradient
checkpointing's recomputation is not counted) x tokens/s over the device's bf16 peak (estimate.DEVICES).
Printed last (best of the repeats): each tunelab variant's / TRL's tokens/s and peak memory at the same dropout, then
tunelab's defaults against TRL's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from tunelab.estimate import runtime_mb  # resident memory now, from /proc

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
LORA = dict(r=16, alpha=32)


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or resident memory sampled on a thread (CPU)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.start = runtime_mb() if not self.cuda else torch.cuda.memory_allocated() / 2**20
        self.peak, self._stop = self.start, threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, runtime_mb())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, runtime_mb())


def gsm8k_rows(n: int, offset: int, split: str) -> list[dict]:
    path = SHARED_GSM8K / f"{split}.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:  # the bundled sample inside the package
        from tunelab.data.sources import read_source

        rows = [r.data for r in read_source(f"bundled:gsm8k/{split}")]
    random.Random(0).shuffle(rows)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows[offset:offset + n]]


def chained_rows(n: int, split: str, tokenizer, seed: int = 0, low: int = 300, high: int = 2000) -> list[dict]:
    """`n` multi-turn conversations, each GSM8K exchanges chained until a target length drawn log-uniformly from
    [low, high] tokens (FineTome's conversations: most a few hundred tokens, a tail to ~2,000). Exchanges are used
    once each; the pool is the split, reused from the start if it runs out."""
    import math

    rng = random.Random(seed)
    pool = gsm8k_rows(100_000, 0, split)
    cost = [len(tokenizer(r["question"] + r["answer"])["input_ids"]) + 10 for r in pool]  # + the template's tokens
    out, i = [], 0
    for _ in range(n):
        target = math.exp(rng.uniform(math.log(low), math.log(high)))
        messages, length = [], 0
        while length < target:
            r, c = pool[i % len(pool)], cost[i % len(pool)]
            i += 1
            messages += [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            length += c
        out.append({"messages": messages})
    return out


def rows_for(a, n: int, split: str, tokenizer) -> list[dict]:
    if a.data == "chained":
        low, high = a.lengths
        return chained_rows(n, split, tokenizer, seed=0 if split == "train" else 1, low=low, high=high)
    return gsm8k_rows(n, 0, split)


def as_messages(r: dict) -> list[dict]:
    return r["messages"] if "messages" in r else [{"role": "user", "content": r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}]


TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 4096, "vocab_size": 49152, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
SHAPES = {"seed": dict(batch_size=2, grad_accum=4, max_length=2048),
          "throughput": dict(batch_size=16, grad_accum=1, max_length=2048)}


def heldout_loss(model, rows: list[dict]) -> float:
    """Mean cross-entropy over the assistant tokens of the held-out rows (tunelab's loss mask), in float32."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]], device=model.device), torch.tensor([r["labels"]])
            labels = labels.to(model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            mask = labels[:, 1:] != -100
            total += torch.nn.functional.cross_entropy(logits[mask], labels[:, 1:][mask], reduction="sum").item()
            count += int(mask.sum())
    model.train(was_training)
    return total / count


def run_trl(model_path: str, tokenizer, rows: list[dict], a, out: str):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"messages": as_messages(r)} for r in rows])
    args = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                     gradient_accumulation_steps=a.grad_accum,
                     learning_rate=a.lr, lr_scheduler_type="linear", max_length=a.max_length, seed=42,
                     save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding",
                     use_cpu=not torch.cuda.is_available())
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=a.dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    if a.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        args.model_init_kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)}
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return trainer.model, trainer.state.num_input_tokens_seen, seconds, mem


def run_tunelab(model_source: str, rows: list[dict], a, workdir: Path, overrides: list[str]):
    from transformers import TrainerCallback

    from tunelab import load_config
    from tunelab.train import run_training

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    keep = Keep()
    cfg = load_config(None, [f"model.source={model_source}", f"data.train={data}", f"data.max_length={a.max_length}",
                             "data.shuffle=false", "adapter.type=lora", f"adapter.r={LORA['r']}",
                             f"adapter.alpha={LORA['alpha']}", f"adapter.dropout={a.dropout}",
                             f"training.max_steps={a.steps}", f"training.batch_size={a.batch_size}",
                             f"training.grad_accum={a.grad_accum}",
                             f"training.learning_rate={a.lr}", "training.scheduler=linear",
                             "training.save_steps=100000", f"output.dir={workdir}", "output.name=tunelab",
                             *(["quantization.bits=4"] if a.qlora else []), *overrides])
    with PeakMemory() as mem:
        summary = run_training(cfg, overwrite=True, callbacks=[keep], echo=lambda *x: None, show_progress=False)
    # run_training's own train() wall time; the peak also covers its model load and final save
    return keep.model, summary["tokens"], summary["train_seconds"], mem, summary


def model_from_config(config_path: str, workdir: Path, tokenizer_source: str) -> str:
    """A model directory with random bf16 weights of the architecture in `config_path` and a small tokenizer (the
    embedded one by default; ids stay below its 49,152 entries): for benchmarks of a model size whose weights cannot
    be fetched here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab import models

    if config_path == "tiny":  # CPU-sized, to run the benchmark's every path in seconds
        config_path = str(workdir / "tiny.json")
        Path(config_path).write_text(json.dumps(TINY))
    out = workdir / Path(config_path).stem
    config = AutoConfig.from_pretrained(config_path)
    # a tokenizer directory on its own has no config.json, which tunelab's model sources require
    tokenizer = (AutoTokenizer.from_pretrained(tokenizer_source) if Path(tokenizer_source).is_dir()
                 else models.load_tokenizer(tokenizer_source))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    # built on the GPU where there is one: an 8B model's random init takes minutes on CPU cores
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return str(out)


def flops_per_token(model_path: str, a, mean_tokens: float) -> float:
    """Model FLOPs per trained token for LoRA r=16 on this model (tunelab.estimate), at the rows' mean length."""
    from tunelab import estimate
    from tunelab import load_config

    cfg = load_config(None, [f"model.source={model_path}", "adapter.r=16", "training.batch_size=1",
                             f"data.max_length={a.max_length}"])
    est = estimate.estimate(cfg, "cpu", mean_tokens=mean_tokens, max_tokens=a.max_length, baseline_mb=0,
                            lean_loss=False)
    return est.flops_per_step / est.tokens_per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="hub id, local dir, embedded:NAME or config:CONFIG.json (random weights)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (rows used: steps x batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (both paths)")
    p.add_argument("--shape", choices=SHAPES, help="seed: batch 2 x accumulation 4, max_length 2048; throughput: "
                   "batch 16 x 1, max_length 2048 (overrides --batch-size, --grad-accum, --max-length)")
    p.add_argument("--data", choices=("gsm8k", "chained"), default="gsm8k",
                   help="gsm8k: one exchange per row; chained: multi-turn conversations of 300-2,000 tokens")
    p.add_argument("--lengths", type=lambda v: tuple(int(x) for x in v.split(",")), default=(300, 2000),
                   metavar="LOW,HIGH", help="token range of --data chained conversations (smaller: a CPU check)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, interleaved")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--heldout", type=int, default=24, help="held-out GSM8K test rows for the loss after training")
    p.add_argument("--dropouts", type=lambda v: [float(x) for x in v.split(",")], default=[0.05, 0.0],
                   help="LoRA dropouts to run both paths at (comma-separated)")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base on both sides (bitsandbytes)")
    p.add_argument("--tunelab", nargs="*", action="append", metavar="KEY=VALUE",
                   help="one tunelab variant with these config overrides, e.g. data.padding_free=true "
                   "method.use_liger_kernel=true; repeat for several variants (default: one, tunelab's defaults)")
    p.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct",
                   help="tokenizer of a config: model (hub id, local dir or embedded:NAME)")
    p.add_argument("--json", help="also write every run's figures to this JSON file")
    a = p.parse_args()
    for k, v in SHAPES.get(a.shape, {}).items():
        setattr(a, k, v)
    variants = {(" ".join(v) or "defaults"): v for v in (a.tunelab or [[]])}

    import torch

    from tunelab import estimate, models, train
    from tunelab import load_config
    from tunelab.data.build import prepare_sft

    train.quiet_libraries()
    device = estimate.local_device()
    peak_flops = estimate.DEVICES[device]["flops"]
    with tempfile.TemporaryDirectory() as tmp:
        if a.model.startswith("config:"):
            a.model = model_from_config(a.model.removeprefix("config:"), Path(tmp), a.tokenizer)
        model_path = models.resolve_source(a.model)
        tokenizer = models.load_tokenizer(a.model)
        rows = rows_for(a, a.steps * a.batch_size * a.grad_accum, "train", tokenizer)
        lengths = [len(tokenizer(tokenizer.apply_chat_template(as_messages(r), tokenize=False))["input_ids"])
                   for r in rows]
        mean_len = sum(min(n, a.max_length) for n in lengths) / len(lengths)
        per_token = flops_per_token(model_path, a, mean_len)
        held = Path(tmp) / "heldout.jsonl"
        held.write_text("".join(json.dumps(r) + "\n" for r in rows_for(a, a.heldout, "test", tokenizer)))
        heldout, _, _ = prepare_sft(load_config(None, [f"data.train={held}", "data.shuffle=false",
                                                       f"data.max_length={a.max_length}"]).data, tokenizer)
        print(f"# {a.model} | {len(rows)} {a.data} rows (mean {mean_len:.0f}, max {max(lengths)} tokens), "
              f"{a.steps} steps x batch {a.batch_size} x accumulation {a.grad_accum}, max_length {a.max_length}, "
              "LoRA r=16 all-linear, "
              f"dropouts {a.dropouts} | "
              f"{'QLoRA 4-bit | ' if a.qlora else ''}device {device} ({peak_flops / 1e12:g} TFLOP/s bf16 peak), "
              f"{per_token / 1e9:.2f} GFLOP per token | torch threads {torch.get_num_threads()} | "
              f"load {os.getloadavg()[0]:.2f} at start")
        results: dict[tuple[str, float], list[dict]] = {}
        for rep in range(a.repeats):
            for dropout in a.dropouts:
                a.dropout = dropout
                for name in ("trl", *variants):
                    est = None
                    try:
                        if name == "trl":
                            model, tokens, seconds, mem = run_trl(model_path, tokenizer, rows, a, f"{tmp}/trl")
                        else:
                            model, tokens, seconds, mem, summary = run_tunelab(a.model, rows, a, Path(tmp),
                                                                               variants[name])
                            est = summary.get("memory_estimate")
                    except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others' figures)
                        print(f"{name} dropout {dropout} run {rep + 1}: FAILED {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}", flush=True)
                        continue
                    loss = heldout_loss(model, heldout)
                    r = {"path": name, "dropout": dropout, "tokens": int(tokens), "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "mfu": tokens / seconds * per_token / peak_flops,
                         "peak_mb": mem.peak, "peak_rise_mb": mem.peak - mem.start, "heldout_loss": loss,
                         "load": os.getloadavg()[0], "memory_estimate": est}
                    results.setdefault((name, dropout), []).append(r)
                    label = "tunelab" if name == "defaults" else ("trl" if name == "trl" else f"tunelab[{name}]")
                    # the run's own estimate (printed at its start) against its measured peak (summary.json); on CPU
                    # the process' resident high-water mark also holds the runs before it, so only on a GPU, whose
                    # allocator peak is reset per run
                    vs = (f" | estimate {est['total_mb']:.0f} MB, measured/estimate {est['measured_over_estimate']:.2f}"
                          if est and torch.cuda.is_available() else "")
                    print(f"{label} dropout {dropout:<4} run {rep + 1}: {r['tokens']} real tokens in {seconds:.1f} s "
                          f"= {r['tokens_per_s']:.1f} tokens/s | peak {r['peak_mb']:.0f} MB (+{r['peak_rise_mb']:.0f} "
                          f"MB while training) | MFU {r['mfu']:.1%} | held-out loss {loss:.4f} | "
                          f"load {r['load']:.2f}{vs}", flush=True)
                    del model
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        if a.json:
            Path(a.json).write_text(json.dumps([r for v in results.values() for r in v], indent=1))
        best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
        for dropout in a.dropouts:
            t = best.get(("trl", dropout))
            for name in variants:
                u = best.get((name, dropout))
                if t is None or u is None:
                    continue
                print(f"same hyper-parameters, dropout {dropout}, tunelab {name}: tunelab / plain TRL real tokens/s "
                      f"{u['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak memory {u['peak_mb'] / t['peak_mb']:.2f}x | "
                      f"held-out loss trl {t['heldout_loss']:.4f}, tunelab {u['heldout_loss']:.4f}")
        first = next(iter(variants))
        if ("trl", 0.05) in best and (first, 0.0) in best:
            t, u = best[("trl", 0.05)], best[(first, 0.0)]
            print(f"defaults (tunelab LoRA dropout 0 vs TRL's 0.05): tunelab / plain TRL real tokens/s "
                  f"{u['tokens_per_s'] / t['tokens_per_s']:.2f}x | held-out loss trl {t['heldout_loss']:.4f}, "
                  f"tunelab {u['heldout_loss']:.4f} (best of {a.repeats})")

if __name__ == "__main__":
    main()
