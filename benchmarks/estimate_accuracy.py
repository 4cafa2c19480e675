"""`tunelab estimate` against the measured peak, for every shipped CPU config.

Each config trains for a few steps in its own process (`tunelab train CONFIG training.max_steps=N`), so the measured
peak (the process' resident high-water mark) belongs to that run alone; summary.json holds both numbers. Configs
whose data is not on this machine (hh-rlhf from ../shared) are listed as skipped. The last line is the count within
the +-20% target.

    python benchmarks/estimate_accuracy.py                     # all shipped CPU configs, 2 steps each
    python benchmarks/estimate_accuracy.py configs/qa/lora.yaml --steps 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# configs/gsm8k/grpo.yaml is a GPU config (Llama-3.2-1B QLoRA); configs/sweeps/ are sweep files, not runs
CPU_CONFIGS = ["quickstart.yaml", "qa/lora.yaml", "qa/qlora.yaml", "qa/dora.yaml", "qa/prefix.yaml",
               "qa/ptuning.yaml", "qa/prompt.yaml", "preference/dpo-hh.yaml", "preference/orpo-hh.yaml",
               "preference/simpo-hh.yaml", "preference/kto-hh.yaml", "preference/reward-hh.yaml",
               "gsm8k/grpo-cpu.yaml", "gsm8k/ppo.yaml", "distill/smollm2-half.yaml", "distill/smollm2-sequence.yaml"]


def measure(config: Path, steps: int, out: Path) -> dict | str:
    name = config.stem
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), f"training.max_steps={steps}",
                           "training.save_steps=100000", f"output.dir={out}", f"output.name={name}"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads((out / name / "summary.json").read_text())["memory_estimate"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="configs to check (default: every shipped CPU config)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per config")
    a = ap.parse_args()
    configs = [Path(c) for c in a.configs] or [ROOT / "configs" / c for c in CPU_CONFIGS]
    rows, inside = [], 0
    print("| config | estimate MB | measured peak MB | measured / estimate |\n| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            m = measure(config.resolve(), a.steps, Path(tmp))
            label = str(config.resolve().relative_to(ROOT)) if config.resolve().is_relative_to(ROOT) else str(config)
            if isinstance(m, str):
                print(f"| {label} | — | — | skipped: {m} |", flush=True)
                continue
            ratio = m["measured_over_estimate"]
            inside += 0.8 <= ratio <= 1.2
            rows.append(ratio)
            print(f"| {label} | {m['total_mb']:,.0f} | {m['measured_peak_mb']:,.0f} | {ratio:.2f} |", flush=True)
    print(f"\nwithin +-20% of the estimate: {inside} of {len(rows)} measured configs "
          f"(ratios {min(rows, default=0):.2f}-{max(rows, default=0):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
