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
    assert "batch 2 x accumulation 4, max_length 2048" in lines[0]
    assert lines[-1].startswith("same hyper-parameters, dropout 0.0, tunelab defaults: tunelab / plain TRL")
    runs = json.loads(out.read_text())
    assert {r["path"] for r in runs} == {"trl", "defaults"}
    for r in runs:  # both trained on the same 8 conversations (1 step x 2 x 4) and were scored on held-out rows
        assert r["tokens"] > 8 * 40 and 0 < r["heldout_loss"] < 20
    assert runs[0]["tokens"] == runs[1]["tokens"]
