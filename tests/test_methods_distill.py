"""Distillation on tiny models: logit distillation (forward / reverse KL) and sequence-level distillation lower the
student-teacher KL on held-out text; a student made from the teacher's own layers; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model
from tunelab import load_config
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


def test_compare_scores_batch_by_batch_like_all_at_once(tmp_path, tiny_model, student, tiny_chat_data):
    """compare() runs one batch through both models at a time; its KL and perplexities equal a computation over all
    rows at once, and a model compared with itself has KL 0."""
    import math

    import torch

    from tunelab import models
    from tunelab.data.build import prepare_sft
    from tunelab.methods.distill import distill_loss
    from tunelab.methods.distill_report import compare

    tok = models.load_tokenizer(tiny_model)
    cfg = load_config(write_config(tmp_path, tiny_model, tiny_chat_data, {}, name="cmp"))
    rows, _, _ = prepare_sft(cfg.data, tok)
    rows = rows[:5]  # batches of 2, 2 and 1: padding differs per batch
    t = models.load_model(load_config(None, [f"model.source={tiny_model}"]), precision="fp32").eval()
    s = models.load_model(load_config(None, [f"model.source={student}"]), precision="fp32").train()
    got = compare(t, s, rows, batch_size=2)
    assert s.training  # restored

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
    mask = (torch.arange(width) < torch.tensor([[len(r["input_ids"])] for r in rows])).long()
    lab = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])[:, 1:]
    with torch.no_grad():
        tl = t(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        sl = s.eval()(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = lambda lg: float(torch.nn.functional.cross_entropy(lg.flatten(0, 1), lab.flatten(), ignore_index=-100))
    assert got["kl_teacher_student"] == pytest.approx(float(distill_loss(sl, tl, lab, "forward_kl", 1.0)), abs=1e-4)
    assert got["teacher"]["perplexity"] == pytest.approx(math.exp(ce(tl)), rel=1e-3)
    assert got["student"]["perplexity"] == pytest.approx(math.exp(ce(sl)), rel=1e-3)
    assert got["kl_teacher_student"] > 0.01  # two random tiny models: near-uniform logits, a small but real KL
    assert compare(t, t, rows, batch_size=2)["kl_teacher_student"] == pytest.approx(0, abs=1e-6)


def test_teacher_forward_runs_in_mixed_precision(tmp_path, tiny_model, tiny_chat_data, monkeypatch):
    """The loss calls the teacher directly, outside the forward accelerate wraps in autocast: under bf16 its
    forwards during training must still run in mixed precision (on CPU a float32 teacher otherwise multiplies in
    float32, several times slower: a third of configs/distill/smollm2-half.yaml's step)."""
    import torch

    from tunelab.methods.distill import Distill

    seen = []
    extra_models = Distill.extra_models

    def hooked(self, cfg, opts, precision):
        models = extra_models(self, cfg, opts, precision)
        models["teacher"].register_forward_hook(
            lambda module, args, output: seen.append((torch.is_autocast_enabled("cpu"), output.logits.dtype)))
        return models

    monkeypatch.setattr(Distill, "extra_models", hooked)
    path = write_config(tmp_path, tiny_model, tiny_chat_data, {"student_layers": 1}, max_steps=2, precision="bf16")
    assert run_training(load_config(path), show_progress=False)["status"] == "complete"
    assert (True, torch.bfloat16) in seen, seen


def test_the_report_is_written_by_the_first_process_only(tmp_path, tiny_model):
    """Every process compares teacher and student at the end (a collective forward under ZeRO-3); the first alone
    writes distill_report.md/json."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tunelab.methods.distill_report import report_callback

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]
    report = report_callback(model, rows)
    for first, run in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        (run / ".staging").mkdir(parents=True)
        state = SimpleNamespace(global_step=0, is_world_process_zero=first)
        report.on_train_begin(SimpleNamespace(), state, None, model=model)
        report.on_train_end(SimpleNamespace(output_dir=str(run / ".staging")), state, None, model=model)
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [".staging", "distill_report.json",
                                                                      "distill_report.md"]
    assert [p.name for p in (tmp_path / "rank1").iterdir()] == [".staging"]
    assert json.loads((tmp_path / "rank0" / "distill_report.json").read_text())["after"]["held_out_rows"] == 1


def test_student_with_adapter_is_saved_as_the_merged_student(tmp_path, tiny_model, tiny_chat_data):
    """student_layers with LoRA: the 1-layer student exists only in the run, so final/ is the student with its adapter
    merged in, not an adapter over the 2-layer teacher. Plain transformers and `tunelab chat/eval --run`
    (load_for_inference) get the trained student's logits back; prefix tuning, which cannot merge, is refused."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from tunelab.methods.distill import keep_layers
    from tunelab.models import load_for_inference

    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])

    class Logits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                self.logits = model(input_ids=ids).logits

    def with_adapter(adapter, name):
        path = write_config(tmp_path, tiny_model, tiny_chat_data, {"student_layers": 1}, name=name, max_steps=4)
        cfg = yaml.safe_load(path.read_text())
        cfg["adapter"] = adapter
        path.write_text(yaml.safe_dump(cfg))
        return load_config(path)

    captured = Logits()
    summary = run_training(with_adapter({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "lora"),
                           callbacks=[captured], show_progress=False)
    final = Path(summary["final"])
    assert not (final / "adapter_config.json").exists()
    saved = AutoModelForCausalLM.from_pretrained(final).eval()
    assert saved.config.num_hidden_layers == 1
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, captured.logits, atol=1e-4, rtol=1e-4)
        served, _ = load_for_inference(run=summary["run"])
        torch.testing.assert_close(served(input_ids=ids).logits, captured.logits, atol=1e-4, rtol=1e-4)
        untrained = keep_layers(AutoModelForCausalLM.from_pretrained(tiny_model), 1).eval()
        assert (untrained(input_ids=ids).logits - captured.logits).abs().max() > 1e-3  # the adapter was trained

    with pytest.raises(UserError, match="student_layers with adapter.type 'prefix'"):
        run_training(with_adapter({"type": "prefix"}, "prefix"), show_progress=False)
    assert not (tmp_path / "runs" / "prefix").exists()
