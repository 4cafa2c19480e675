"""The benchmarks run: every path of the SFT throughput benchmark at tiny shapes on this CPU (the GPU table uses the
same code at 1B/8B shapes), and its FineTome-like data has the lengths it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "tokenizer"


def test_chained_conversations_are_multi_turn_within_their_length_range():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from sft_throughput import chained_rows
    finally:
        sys.path.pop(0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = chained_rows(12, "train", tok, low=300, high=2000)
    turns = [len(r["messages"]) for r in rows]
    assert all(t % 2 == 0 and t >= 2 for t in turns) and max(turns) >= 6  # several exchanges chained
    lengths = [sum(len(tok(m["content"])["input_ids"]) for m in r["messages"]) for r in rows]
    assert min(lengths) >= 250 and max(lengths) <= 2600 and max(lengths) > 2 * min(lengths), lengths
    assert all(m["role"] == ("user", "assistant")[i % 2] for r in rows for i, m in enumerate(r["messages"]))


def test_estimate_accuracy_takes_the_median_step_after_the_first():
    """The measured step time is the median of the per-step durations after step 1 (its warm-up left out), so one
    slow step on a busy machine does not move it; it needs two logged steps; evaluation rows do not count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from estimate_accuracy import step_seconds
    finally:
        sys.path.pop(0)

    rows = [{"step": 1, "loss": 2.0, "elapsed": 30.0}, {"step": 2, "loss": 1.9, "elapsed": 33.0},
            {"step": 2, "eval_loss": 1.8, "elapsed": 40.0}, {"step": 3, "loss": 1.8, "elapsed": 45.0},
            {"step": 4, "loss": 1.7, "elapsed": 48.5}, {"step": 5, "loss": 1.6, "elapsed": 51.5},
            {"step": 6, "loss": 1.5, "elapsed": 54.5}]
    assert step_seconds(rows) == 3.0  # durations 3, 12, 3.5, 3, 3: first-to-last would say 4.9
    assert step_seconds([{"step": 1, "loss": 1.0, "elapsed": 9.0}, {"step": 3, "loss": 1.0, "elapsed": 13.0}]) == 2.0
    assert step_seconds(rows[:1]) is None


def test_estimate_accuracy_times_grouped_pairs_in_a_run_drawn_at_random():
    """Pairs grouped by length start with their longest batches: those configs (DPO, ORPO, SimPO, reward by default)
    get a second, randomly drawn run for the step time; KTO, SFT and pairs already drawn at random do not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from estimate_accuracy import grouped_pairs
    finally:
        sys.path.pop(0)

    configs = ROOT / "configs"
    assert all(grouped_pairs(configs / "preference" / f"{m}-hh.yaml") for m in ("dpo", "orpo", "simpo", "reward"))
    assert not any(grouped_pairs(configs / c) for c in ("preference/kto-hh.yaml", "qa/lora.yaml", "gsm8k/ppo.yaml"))


@pytest.mark.slow
def test_sft_throughput_benchmark_runs_both_paths_at_the_seed_shape(tmp_path):
    out = tmp_path / "runs.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sft_throughput.py"), "--model", "config:tiny", "--tokenizer",
         str(TOKENIZER), "--data", "chained", "--lengths", "40,120", "--shape", "seed", "--steps", "1",
         "--repeats", "1", "--dropouts", "0", "--heldout", "2", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    header = next(line for line in lines if line.startswith("# "))  # DeepSpeed, imported by accelerate, logs first
    assert "batch 2 x accumulation 4, max_length 2048" in header
    assert lines[-1].startswith("same hyper-parameters, dropout 0.0, tunelab defaults: tunelab / plain TRL")
    runs = json.loads(out.read_text())
    assert {r["path"] for r in runs} == {"trl", "defaults"}
    for r in runs:  # both trained on the same 8 conversations (1 step x 2 x 4) and were scored on held-out rows
        assert r["tokens"] > 8 * 40 and 0 < r["heldout_loss"] < 20
    assert runs[0]["tokens"] == runs[1]["tokens"]


def test_gpu_suite_stops_at_its_budget_and_logs_each_step(tmp_path):
    """gpu_suite.sh on a rented GPU: BUDGET_S is a hard limit (the step running when it is spent is stopped, none
    starts after it), FAIL_FAST=1 ends the suite at a failure before any step passed, and every step's start and
    end are in progress.txt. A budget of 2 s stops its first step (the package check imports torch, TRL, PEFT)."""
    import os

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BUDGET_S": "2", "FAIL_FAST": "1", "MODELS": "tiny",
           "TOKENIZER": str(TOKENIZER), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "# FAILED: versions (exit 124: stopped at the budget" in proc.stdout
    progress = (out / "progress.txt").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in progress] == ["start versions", "FAILED versions (exit 124)"]
    assert not list(out.glob("build-*.log")), "no step may start after a failure before any step passed"


def test_offline_wheels_keeps_the_target_cuda_library_of_bitsandbytes_and_a_valid_record(tmp_path):
    """offline_wheels.sh slims bitsandbytes' wheel to the target's CUDA library and the CPU one (its other CUDA/ROCm
    builds are most of its size), rewrites RECORD to match, and the slim wheel still installs; the tokenizer is saved
    for the suite's TOKENIZER=. PKGS="" downloads nothing."""
    import os
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = ["bitsandbytes/__init__.py"] + [f"bitsandbytes/libbitsandbytes_{lib}.so"
                                            for lib in ("cpu", "cuda118", "cuda130", "rocm72")]
    info = "bitsandbytes-0.50.2.dist-info/"
    with zipfile.ZipFile(wheels / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "w") as whl:
        for name in names:
            whl.writestr(name, "x")
        whl.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n")
        whl.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                                     "Tag: py3-none-manylinux_2_24_x86_64\n")
        whl.writestr(info + "RECORD", "".join(f"{n},,\n" for n in [*names, info + "METADATA", info + "WHEEL",
                                                                     info + "RECORD"]))
    env = {**os.environ, "PKGS": "", "PY": sys.executable, "TOKENIZER": str(TOKENIZER)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "offline_wheels.sh"), str(wheels)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (slim,) = wheels.glob("bitsandbytes-*.whl")
    with zipfile.ZipFile(slim) as whl:
        kept = [n for n in whl.namelist() if n.endswith(".so")]
        record = [line.split(",")[0] for line in whl.read(info + "RECORD").decode().splitlines()]
    assert sorted(kept) == ["bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert [n for n in record if n.endswith(".so")] == kept
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(slim)], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in (site / "bitsandbytes").glob("*.so")) == ["libbitsandbytes_cpu.so",
                                                                            "libbitsandbytes_cuda130.so"]
    assert (wheels / "tok" / "tokenizer.json").exists()


def test_frozen_storage_benchmark_times_both_base_dtypes(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frozen_storage.py"), "--model", tiny_model,
                           "--batch", "2", "--length", "32", "--padded", "0.5", "--repeats", "1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("cls:", "lm:"))]
    assert [r.split(":")[0] for r in rows] == ["cls", "lm"]
    assert all("float32 / bf16" in r and r.rstrip().endswith("x") for r in rows)
