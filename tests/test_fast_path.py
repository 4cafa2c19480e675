"""The fast SFT path (lean loss) trains to the same losses as TRL's own loss and as plain TRL SFTTrainer.

No timings here: speed is measured in benchmarks/sft_throughput.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train import run_training

from test_train import losses, make_config

SETTINGS = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 100, "group_by_length": False,
            "precision": "fp32"}


def _run(tmp_path, tiny_model, data, name, loss):
    path = make_config(tmp_path, tiny_model, data, name=name, training=SETTINGS, method={"name": "sft", "loss": loss})
    summary = run_training(load_config(path), show_progress=False)
    assert summary["status"] == "complete"
    return losses(Path(summary["run"]))


def test_lean_loss_equals_trl_fused_loss(tmp_path, tiny_model, tiny_chat_data):
    lean = _run(tmp_path, tiny_model, tiny_chat_data, "lean", "lean")
    fused = _run(tmp_path, tiny_model, tiny_chat_data, "fused", "fused")
    assert lean.keys() == fused.keys() and len(lean) == SETTINGS["max_steps"]
    for step in lean:
        assert lean[step] == pytest.approx(fused[step], abs=1e-4), (step, lean, fused)
    assert lean[max(lean)] < lean[1] - 0.3  # and it learns


def test_default_path_matches_plain_trl(tmp_path, tiny_model, tiny_chat_data):
    """Plain TRL SFTTrainer (its own loss) on the rows tunelab prepared, same hyperparameters and seed."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunelab import models
    from tunelab.data.build import prepare_sft

    ours = _run(tmp_path, tiny_model, tiny_chat_data, "ours", "auto")
    cfg = load_config(make_config(tmp_path, tiny_model, tiny_chat_data, name="plain", training=SETTINGS))
    tok = models.load_tokenizer(tiny_model)
    train, _, _ = prepare_sft(cfg.data, tok)
    from transformers import set_seed

    set_seed(cfg.training.seed)
    model = models.attach_adapter(models.load_model(cfg), cfg)
    args = SFTConfig(output_dir=str(tmp_path / "plain-out"), max_steps=SETTINGS["max_steps"],
                     per_device_train_batch_size=4, learning_rate=5e-3, lr_scheduler_type="linear", logging_steps=1,
                     save_strategy="no", seed=cfg.training.seed, data_seed=cfg.training.seed, bf16=False,
                     gradient_checkpointing=False, report_to="none", use_cpu=True, max_length=128,
                     dataloader_num_workers=0, remove_unused_columns=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tok)
    trainer.train()
    plain = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    assert plain.keys() == ours.keys()
    for step in ours:
        assert ours[step] == pytest.approx(plain[step], abs=1e-3), (step, ours, plain)
