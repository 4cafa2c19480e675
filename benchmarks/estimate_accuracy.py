"""`tunelab estimate` against the measured peak memory and step time, for every shipped CPU config.

Each config trains for a few steps in its own process (`tunelab train CONFIG training.max_steps=N`, logging every
step), so the measured peak (the process' resident high-water mark) belongs to that run alone; summary.json holds
both numbers. The measured step time is the median of the per-step durations on the run clock of metrics.jsonl after
step 1 (which pays one-off warm-up; the median is steadier than first-to-last on a noisy machine), against the
estimate's seconds per step; the table also gives the peak FLOP/s the estimate took (on CPU: measured by its probe in
that process) and the share of its step time spent generating (GRPO, PPO), with the measured share where the run
logs its sampling time (GRPO's rollout_seconds). Configs whose data is not on this machine (hh-rlhf from ../shared)
are listed as skipped. The last lines count the configs within the +-20% memory and +-30% time targets. Time figures
mean something only on an otherwise idle machine: `uptime`'s load is printed with them. Preference pairs grouped by
length (the default) start with their longest batches: their memory is measured so, their step time in a second run
of the same config with pairs drawn at random (`training.group_by_length=false`), against that run's estimate.

    python benchmarks/estimate_accuracy.py                     # all shipped CPU configs, 4 steps each
    python benchmarks/estimate_accuracy.py configs/qa/lora.yaml --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def step_seconds(rows: list[dict]) -> float | None:
    """The median seconds per step after the first logged step (step 1 pays one-off warm-up) from metrics.jsonl rows
    (training logs: step, elapsed); None with fewer than two logged steps."""
    timed = sorted((r["step"], r["elapsed"]) for r in rows if "loss" in r and "elapsed" in r)
    durations = []
    for (s0, t0), (s1, t1) in zip(timed, timed[1:]):
        if s1 > s0:  # a gap of several steps between two logs counts as that many steps of its mean
            durations += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
    return statistics.median(durations) if durations else None


def grouped_pairs(config: Path) -> bool:
    """Whether the config trains on preference pairs grouped by length (training.group_by_length, the default). Such
    a run starts with its longest batches (the sampler sorts each mega-batch longest first), so its first steps hold
    the largest batch, the memory estimate's, but take longer than the epoch's mean step, the time estimate's."""
    from tunelab import methods
    from tunelab.config import read_config
    from tunelab.methods.preference import groups_pairs

    cfg = read_config(str(config), [])
    return groups_pairs(methods.get(cfg.method.name).data, cfg.training)


def measure(config: Path, steps: int, out: Path, overrides: tuple[str, ...] = (), suffix: str = "") -> dict | str:
    name = config.stem + suffix
    # every step logged, so that each step's duration is on the run clock
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), f"training.max_steps={steps}",
                           "training.save_steps=100000", "training.logging_steps=1", f"output.dir={out}",
                           f"output.name={name}", *overrides], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    est = json.loads((out / name / "summary.json").read_text())["memory_estimate"]
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = step_seconds(rows)
    if measured is not None:
        est["measured_seconds_per_step"] = measured
    sampling = [r["rollout_seconds"] for r in rows if "rollout_seconds" in r and r["step"] > 1]  # GRPO's rollouts
    if sampling:
        est["measured_generation_seconds_per_step"] = statistics.median(sampling)
    return est


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="configs to check (default: every shipped CPU config)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per config (>= 2 for a step time; the "
                    "median is taken over steps 2..N)")
    ap.add_argument("--json", help="also write every config's estimate and measurements to this JSON file")
    a = ap.parse_args()
    configs = [Path(c) for c in a.configs] or [ROOT / "configs" / c for c in CPU_CONFIGS]
    rows, inside, times, in_time, records = [], 0, [], 0, {}
    print(f"load {os.getloadavg()[0]:.2f} at start")
    print("| config | estimate MB | measured peak MB | measured / estimate | peak TFLOP/s | generating | "
          "estimate s/step | measured s/step | measured / estimate |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            m = measure(config.resolve(), a.steps, Path(tmp))
            label = str(config.resolve().relative_to(ROOT)) if config.resolve().is_relative_to(ROOT) else str(config)
            if not isinstance(m, str) and grouped_pairs(config):
                # time from a second run whose pairs are drawn at random, against its own estimate (which counts
                # random batches); memory from the grouped run, whose first step holds the largest batch
                drawn = measure(config.resolve(), a.steps, Path(tmp), ("training.group_by_length=false",), "-random")
                if isinstance(drawn, str):
                    m = drawn
                else:
                    m.pop("measured_seconds_per_step", None)
                    m.update({k: drawn[k] for k in ("seconds_per_step", "measured_seconds_per_step", "peak_flops")
                              if k in drawn})
            if isinstance(m, str):
                print(f"| {label} | — | — | skipped: {m} |", flush=True)
                continue
            records[label] = m
            ratio = m["measured_over_estimate"]
            inside += 0.8 <= ratio <= 1.2
            rows.append(ratio)
            t = m.get("measured_seconds_per_step")
            t_ratio = t / m["seconds_per_step"] if t else None
            if t_ratio is not None:
                times.append(t_ratio)
                in_time += 0.7 <= t_ratio <= 1.3
            generating = m.get("generation_seconds_per_step", 0) / m["seconds_per_step"] if m["seconds_per_step"] else 0
            sampled = m.get("measured_generation_seconds_per_step")
            print(f"| {label} | {m['total_mb']:,.0f} | {m['measured_peak_mb']:,.0f} | {ratio:.2f} | "
                  f"{m.get('peak_flops', 0) / 1e12:.2f} | {generating:.0%}"
                  f"{f' (measured {sampled / t:.0%})' if sampled and t else ''} | "
                  f"{m['seconds_per_step']:.2f} | {f'{t:.2f}' if t else '—'} | "
                  f"{f'{t_ratio:.2f}' if t_ratio else '—'} |", flush=True)
    print(f"\nload {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    print(f"memory within +-20% of the estimate: {inside} of {len(rows)} measured configs "
          f"(ratios {min(rows, default=0):.2f}-{max(rows, default=0):.2f})")
    print(f"step time within +-30% of the estimate: {in_time} of {len(times)} measured configs "
          f"(ratios {min(times, default=0):.2f}-{max(times, default=0):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
