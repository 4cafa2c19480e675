"""Distillation on tiny models: logit distillation (forward / reverse KL) and sequence-level distillation lower the
student-teacher KL on held-out text; a student made from the teacher's own layers; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model
from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.train import run_training


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    """Another random tiny model: it starts far from the teacher."""
    return str(build_tiny_model(tmp_path_factory.mktemp("student"), seed=1))


def write_config(tmp_path, model, data, method, name="run", **training) -> Path:
    cfg = {"model": {"source": model}, "data": {"train": data, "max_length": 64, "val_split": 0.25},
           "adapter": {"type": "none"}, "method": {"name": "distill", **method},
           "training": {"max_steps": 12, "batch_size": 4, "learning_rate": 3e-3, "save_steps": 100,
                        "precision": "fp32", **training},
           "output": {"dir": str(tmp_path / "runs"), "name": name}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def report(summary) -> dict:
    return json.loads((Path(summary["run"]) / "distill_report.json").read_text())


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_logit_distillation_lowers_held_out_kl(tmp_path, tiny_model, student, tiny_chat_data, loss):
    path = write_config(tmp_path, student, tiny_chat_data, {"teacher": tiny_model, "loss": loss, "temperature": 1.0})
    summary = run_training(load_config(path), show_progress=False)
    assert summary["status"] == "complete"
    r = report(summary)
    print(loss, "held-out KL(teacher||student):", r["before"]["kl_teacher_student"], "->",
          r["after"]["kl_teacher_student"])
    assert r["after"]["kl_teacher_student"] < 0.7 * r["before"]["kl_teacher_student"], r
    assert (Path(summary["run"]) / "distill_report.md").read_text().startswith("# Distillation report")


def test_student_from_teacher_layers(tmp_path, tiny_model, tiny_chat_data):
    from transformers import AutoModelForCausalLM

    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"student_layers": 1})
    summary = run_training(load_config(path), show_progress=False)
    r = report(summary)
    assert r["after"]["student"]["params_m"] < r["after"]["teacher"]["params_m"]
    assert r["after"]["kl_teacher_student"] < 0.7 * r["before"]["kl_teacher_student"], r
    final = AutoModelForCausalLM.from_pretrained(summary["final"])
    assert final.config.num_hidden_layers == 1


def test_sequence_distillation_learns_teacher_answers(tmp_path, tiny_model, student, tiny_chat_data):
    """The teacher answers every prompt (greedy); the student is SFT-trained on those answers: its loss falls."""
    path = write_config(tmp_path, student, tiny_chat_data, {"teacher": tiny_model, "mode": "sequence",
                                                            "max_new_tokens": 8}, learning_rate=1e-2)
    summary = run_training(load_config(path), show_progress=False)
    losses = [json.loads(x)["loss"] for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses


def test_distill_refusals(tmp_path, tiny_model, tiny_chat_data):
    with pytest.raises(UserError, match="method.teacher"):
        run_training(load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {})), show_progress=False)
    with pytest.raises(UserError, match="fewer than the teacher's 2 layers"):
        run_training(load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {"student_layers": 2}, name="b")),
                     show_progress=False)
    with pytest.raises(UserError, match="did you mean 'temperature'"):
        load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {"temprature": 2}, name="c"))
