"""Evaluation during `tunelab train`: early stopping at the expected evaluation, best checkpoint restored from the
atomic checkpoints directory, per-epoch table and plots, and the config checks that guard it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_chat

from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training

TRAIN = [("What is 2+2?", "2+2 = 4.\n#### 4"), ("What is 3+5?", "3+5 = 8.\n#### 8"),
         ("Say hi.", "Hi there!"), ("Name a color.", "Blue.")]
VAL = [("Who wrote Hamlet?", "William Shakespeare wrote it around 1600."),
       ("Describe the sea.", "The ocean is vast, deep and salty, full of fish and whales."),
       ("What is rain?", "Water falling from clouds in drops.")]


def _cfg(tmp_path, tiny_model, overrides=()):
    import yaml

    cfg = {
        "model": {"source": tiny_model},
        "data": {"train": write_chat(tmp_path / "train.jsonl", TRAIN, 8),
                 "validation": write_chat(tmp_path / "val.jsonl", VAL, 1), "max_length": 128},
        "adapter": {"type": "none"},
        "training": {"max_steps": 80, "batch_size": 8, "learning_rate": 1e-2, "scheduler": "constant",
                     "eval_steps": 4, "save_steps": 4, "save_total_limit": 1, "precision": "fp32"},
        "eval": {"early_stopping_patience": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "es"},
    }
    p = tmp_path / "es.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_config(p, list(overrides))


def test_early_stopping_restores_best_checkpoint(tmp_path, tiny_model):
    from safetensors.torch import load_file

    summary = run_training(_cfg(tmp_path, tiny_model), show_progress=False)
    run_dir = Path(summary["run"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    losses = [v for _, v in evals]
    best_i = min(range(len(losses)), key=losses.__getitem__)
    # transformers' EarlyStoppingCallback: stop once 3 evaluations in a row do not improve on the best
    assert len(evals) == best_i + 4, evals
    assert summary["global_step"] == evals[-1][0] < 80
    best_step = evals[best_i][0]
    assert summary["best_checkpoint"].endswith(f"checkpoints/checkpoint-{best_step}")
    # the best checkpoint survived rotation (save_total_limit=1 keeps the last one and the best one)
    best = load_file(Path(summary["best_checkpoint"]) / "model.safetensors")
    final = load_file(run_dir / "final" / "model.safetensors")
    for k in best:
        torch.testing.assert_close(final[k], best[k], rtol=0, atol=0)
    assert (run_dir / "loss.png").is_file() and (run_dir / "loss_epoch.png").is_file()
    assert json.loads((run_dir / "epochs.json").read_text())


def test_eval_settings_are_checked_before_loading(tmp_path, tiny_model):
    with pytest.raises(UserError, match="multiple of training.eval_steps"):
        run_training(_cfg(tmp_path, tiny_model, ["training.save_steps=6"]), show_progress=False)
    with pytest.raises(UserError, match="needs validation data"):
        run_training(_cfg(tmp_path, tiny_model, ["data.validation=null"]), show_progress=False)


def test_eval_task_data_is_checked_before_the_run_directory(tmp_path, tiny_model):
    """A task file that is missing or holds no GSM8K questions is refused before anything is written: otherwise the
    run directory would exist and the corrected re-run would be refused as a different config (or, with chat rows,
    every evaluation would score 0 as if the model had failed)."""
    base = ["eval.task=gsm8k", "eval.early_stopping_patience=null", "eval.load_best=false"]
    with pytest.raises(UserError, match=r"^eval\.task_data: .*nope\.jsonl"):
        run_training(_cfg(tmp_path, tiny_model, [*base, f"eval.task_data={tmp_path / 'nope.jsonl'}"]),
                     show_progress=False)
    chat = tmp_path / "train.jsonl"  # written by _cfg: messages rows, no gold answer
    with pytest.raises(UserError, match=r"train\.jsonl:1: eval\.task_data row has no gold number"):
        run_training(_cfg(tmp_path, tiny_model, [*base, f"eval.task_data={chat}"]), show_progress=False)
    assert not (tmp_path / "runs").exists()
