"""Progress where people look: `tunelab train > log` (not a terminal) prints a line per log step with loss, tokens/s
and ETA, and each evaluation's results; evaluation shows progress per batch (plain lines, or a rich bar in a
terminal); durations read as 5m 35s; a finished run leaves no .staging/ behind."""

from __future__ import annotations

import io
import re
from pathlib import Path

from conftest import write_chat

from tunelab import load_config
from tunelab.train import run_training

PAIRS = [("What is 2+2?", "2+2 = 4.\n#### 4"), ("Say hi.", "Hi there!")]


def _cfg(tmp_path, tiny_model):
    import yaml

    cfg = {
        "model": {"source": tiny_model},
        "data": {"train": write_chat(tmp_path / "train.jsonl", PAIRS, 4), "validation": write_chat(tmp_path / "val.jsonl", PAIRS, 1),
                 "max_length": 64},
        "adapter": {"type": "lora", "r": 4},
        "training": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1,
                     "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": "progress"},
    }
    p = tmp_path / "progress.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p, [])


def test_training_without_a_terminal_prints_step_lines_and_eval_results(tmp_path, tiny_model, capsys):
    summary = run_training(_cfg(tmp_path, tiny_model))  # pytest captures stdout: not a terminal
    out = capsys.readouterr().out
    steps = re.findall(r"^step (\d)/4  loss \d+\.\d{4}  \d+ tok/s  elapsed \d+s  ETA \d+s$", out, re.M)
    assert steps == ["1", "2", "3", "4"], out
    assert re.search(r"^step 2/4  eval_loss \d+\.\d{4}", out, re.M) and re.search(r"^step 4/4  eval_loss", out, re.M)
    run = Path(summary["run"])
    # TRL writes a model card into the staging directory at every save; none of it is part of the run
    assert not (run / ".staging").exists() and sorted(p.name for p in (run / "checkpoints").iterdir())


def test_evaluation_prints_progress_per_batch(tiny_model, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.evaluation import gsm8k, perplexity

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"question": f"What is {i}+1?", "answer": f"#### {i + 1}"} for i in range(5)]
    gsm8k.evaluate(model, tok, rows, batch_size=2, max_new_tokens=2)
    out = capsys.readouterr().out
    assert [m for m in re.findall(r"^gsm8k: (\d)/5  elapsed \d+s  ETA (?:\d+s|\d+m \d\ds)$", out, re.M)] == \
        ["2", "4", "5"], out
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    perplexity.evaluate(model, tok, recs, batch_size=1)
    assert re.findall(r"^perplexity: (\d)/2", capsys.readouterr().out, re.M) == ["1", "2"]


def test_batched_generation_with_progress_matches_one_call(tiny_model):
    """Generating batch by batch (to show progress) gives the outputs of one engine call, sampling included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.evaluation.common import chat_with_progress
    from tunelab.inference.engine import GenParams, chat

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    convs = [[{"role": "user", "content": "x" * n}] for n in (3, 9, 1, 7, 5)]
    params = GenParams(max_new_tokens=4, temperature=1.0, seed=3)
    assert chat_with_progress(model, tok, convs, params, 2, "t", show=False) == chat(model, tok, convs, params, 2)


def test_progress_is_a_rich_bar_in_a_terminal(capsys):
    from rich.console import Console

    from tunelab.evaluation.common import progress

    buf = io.StringIO()
    with progress("gsm8k", 4, console=Console(file=buf, force_terminal=True, width=80)) as advance:
        advance(2)
        advance(2)
    assert "gsm8k" in buf.getvalue() and "━" in buf.getvalue()  # the bar, drawn on the terminal
    assert capsys.readouterr().out == ""  # and no plain lines


def test_durations_read_as_minutes_and_seconds():
    from tunelab.evaluation.report import format_duration

    assert [format_duration(s) for s in (4.2, 334.58, 7322)] == ["4s", "5m 35s", "2h 02m"]
