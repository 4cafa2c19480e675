"""LoRA SFT throughput: plain TRL SFTTrainer (its defaults) vs tunelab's default path, in one process.

    python benchmarks/sft_throughput.py                      # embedded SmolLM2-135M, GSM8K rows, 6 steps x 8
    python benchmarks/sft_throughput.py --steps 10 --repeats 2 --model HuggingFaceTB/SmolLM2-360M-Instruct

Both paths train LoRA r=16 (alpha 32, dropout 0.05, all-linear) on the same GSM8K rows (exactly one pass: steps x
batch rows), with the same learning rate and schedule, and run interleaved (TRL, tunelab, TRL, tunelab, ...) so a
busy machine slows both alike. Plain TRL gets chat `messages` and SFTConfig's defaults otherwise (bf16, gradient
checkpointing on, padding to the longest in the batch, loss on every token: TRL's assistant-only loss refuses
SmolLM2's template). tunelab gets an equivalent config through `run_training` (its defaults: assistant-only loss,
length-grouped batches, lean loss on CPU, no gradient checkpointing).

Reported per run: real (non-pad) tokens/s of `train()`, the memory peak while training (CPU: resident memory sampled
every 20 ms, as the rise over the resident memory before the run and as the absolute peak; GPU: allocator peak), and
the loss after training on the same held-out rows (assistant tokens only, so both are scored on the same thing).
The ratio of tunelab's to TRL's tokens/s (best run of each) is printed last.
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

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
LORA = dict(r=16, alpha=32, dropout=0.05)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or resident memory sampled on a thread (CPU)."""

    def __enter__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.start = rss_mb() if not self.cuda else torch.cuda.memory_allocated() / 2**20
        self.peak, self._stop = self.start, threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())


def gsm8k_rows(n: int, offset: int, split: str) -> list[dict]:
    path = SHARED_GSM8K / f"{split}.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:  # the bundled sample inside the package
        from tunelab.data.sources import read_source

        rows = [r.data for r in read_source(f"bundled:gsm8k/{split}")]
    random.Random(0).shuffle(rows)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows[offset:offset + n]]


def heldout_loss(model, rows: list[dict]) -> float:
    """Mean cross-entropy over the assistant tokens of the held-out rows (tunelab's loss mask), in float32."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
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

    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["question"]},
                                            {"role": "assistant", "content": r["answer"]}]} for r in rows])
    args = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                     learning_rate=a.lr, lr_scheduler_type="linear", max_length=a.max_length, seed=42,
                     save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding",
                     use_cpu=not torch.cuda.is_available())
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return trainer.model, trainer.state.num_input_tokens_seen, seconds, mem


def run_tunelab(model_source: str, rows: list[dict], a, workdir: Path):
    from transformers import TrainerCallback

    from tunelab.config import load_config
    from tunelab.train import run_training

    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            self.model = model

    keep = Keep()
    cfg = load_config(None, [f"model.source={model_source}", f"data.train={data}", f"data.max_length={a.max_length}",
                             "data.shuffle=false", "adapter.type=lora", f"adapter.r={LORA['r']}",
                             f"adapter.alpha={LORA['alpha']}", f"adapter.dropout={LORA['dropout']}",
                             f"training.max_steps={a.steps}", f"training.batch_size={a.batch_size}",
                             f"training.learning_rate={a.lr}", "training.scheduler=linear",
                             "training.save_steps=100000", f"output.dir={workdir}", "output.name=tunelab"])
    with PeakMemory() as mem:
        summary = run_training(cfg, overwrite=True, callbacks=[keep], echo=lambda *x: None, show_progress=False)
    # run_training's own train() wall time; the peak also covers its model load and final save
    return keep.model, summary["tokens"], summary["train_seconds"], mem, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="hub id, local dir or embedded:NAME")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (rows used: steps x batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, interleaved")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--heldout", type=int, default=24, help="held-out GSM8K test rows for the loss after training")
    a = p.parse_args()

    import torch

    from tunelab import models, train
    from tunelab.config import load_config
    from tunelab.data.build import prepare_sft

    train.quiet_libraries()
    model_path = models.resolve_source(a.model)
    tokenizer = models.load_tokenizer(a.model)
    rows = gsm8k_rows(a.steps * a.batch_size, 0, "train")
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "heldout.jsonl"
        held.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(a.heldout, 0, "test")))
        heldout, _, _ = prepare_sft(load_config(None, [f"data.train={held}", "data.shuffle=false"]).data, tokenizer)
        print(f"# {a.model} | {len(rows)} GSM8K rows, {a.steps} steps x batch {a.batch_size}, LoRA r=16 all-linear | "
              f"torch threads {torch.get_num_threads()} | load {os.getloadavg()[0]:.2f} at start")
        results = {"trl": [], "tunelab": []}
        for rep in range(a.repeats):
            for name in ("trl", "tunelab"):
                if name == "trl":
                    model, tokens, seconds, mem = run_trl(model_path, tokenizer, rows, a, f"{tmp}/trl")
                else:
                    model, tokens, seconds, mem, _ = run_tunelab(a.model, rows, a, Path(tmp))
                loss = heldout_loss(model, heldout)
                r = {"tokens": int(tokens), "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "peak_mb": mem.peak, "peak_rise_mb": mem.peak - mem.start, "heldout_loss": loss,
                     "load": os.getloadavg()[0]}
                results[name].append(r)
                print(f"{name:8s} run {rep + 1}: {r['tokens']} real tokens in {seconds:.1f} s = "
                      f"{r['tokens_per_s']:.1f} tokens/s | peak {r['peak_mb']:.0f} MB (+{r['peak_rise_mb']:.0f} MB "
                      f"while training) | held-out loss {loss:.4f} | load {r['load']:.2f}", flush=True)
                del model
        best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
        print(f"held-out assistant loss after training: trl {best['trl']['heldout_loss']:.4f}, "
              f"tunelab {best['tunelab']['heldout_loss']:.4f}")
        print(f"ratio tunelab / plain TRL real tokens/s (best of {a.repeats}): "
              f"{best['tunelab']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
