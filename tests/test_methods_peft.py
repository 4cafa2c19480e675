"""Prompt-learning and IA3 adapters for SFT: prefix tuning, prompt tuning (random and text init), P-tuning, IA3.

Each trains (the loss falls), and the run's final/ reloads with plain PEFT onto the base model and gives the same
logits as the model that was trained in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tunelab import load_config
from tunelab.train import run_training

ADAPTERS = {
    "prefix": {"type": "prefix", "num_virtual_tokens": 8, "prefix_projection": True},
    "prompt": {"type": "prompt", "num_virtual_tokens": 8},
    "prompt-text-init": {"type": "prompt", "num_virtual_tokens": 8, "prompt_init_text": "Answer the question briefly."},
    "ptuning": {"type": "ptuning", "num_virtual_tokens": 8, "encoder_hidden_size": 32},
    "ia3": {"type": "ia3"},
}
# Prompt-learning adapters have few parameters and need a far higher learning rate than LoRA.
LEARNING_RATES = {"prefix": 3e-2, "prompt": 0.3, "prompt-text-init": 0.3, "ptuning": 3e-2, "ia3": 0.3}


class Capture(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        self.model = model


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_trains_and_reloads_with_same_logits(tmp_path, tiny_model, tiny_chat_data, name):
    cfg = {
        "model": {"source": tiny_model},
        "data": {"train": tiny_chat_data, "max_length": 64},
        "adapter": ADAPTERS[name],
        "training": {"max_steps": 12, "batch_size": 4, "learning_rate": LEARNING_RATES[name], "save_steps": 100,
                     "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cap = Capture()
    summary = run_training(load_config(path), callbacks=[cap], show_progress=False)
    ls = losses(Path(summary["run"]))
    print(f"{name}: loss {ls[0]:.3f} -> {sum(ls[-3:]) / 3:.3f} ({summary['trainable_params']} trainable)")
    # a random tiny model barely conditions on virtual tokens, so the drop is small but steady (runs are seeded)
    assert sum(ls[-3:]) / 3 < ls[0] - 0.05, ls
    assert summary["trainable_params"] < summary["total_params"] / 10

    from peft import PeftModel

    final = Path(summary["final"])
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == {
        "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "prompt-text-init": "PROMPT_TUNING",
        "ptuning": "P_TUNING", "ia3": "IA3"}[name]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    trained = cap.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-5)
        # and the adapter did change the model: the base alone answers differently
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
        assert (reloaded(input_ids=ids).logits[:, -ids.shape[1]:] - base).abs().max() > 1e-3


def test_prefix_with_best_checkpoint_ends_with_the_best_adapter(tmp_path, tiny_model, tiny_chat_data):
    """With evaluation and `eval.load_best`, a prefix-tuning run completes (transformers cannot load a prompt-learning
    checkpoint back into the training model) and final/ holds the best checkpoint's adapter, loadable with PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = {
        "model": {"source": tiny_model},
        "data": {"train": tiny_chat_data, "max_length": 64, "val_split": 0.25},
        "adapter": ADAPTERS["prefix"],
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": LEARNING_RATES["prefix"], "save_steps": 2,
                     "eval_steps": 2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": "prefix-best"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_training(load_config(path), show_progress=False)
    assert summary["status"] == "complete"
    best = Path(summary["best_checkpoint"])
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (Path(summary["run"]) / "metrics.jsonl")
                                                    .read_text().splitlines()) if "eval_loss" in r}
    assert best.name == f"checkpoint-{min(evals, key=evals.get)}" and best.is_dir()
    final = Path(summary["final"])
    a, b = load_file(final / "adapter_model.safetensors"), load_file(best / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=torch.tensor([tok("2+2=")["input_ids"]])).logits).all()


@pytest.mark.parametrize("name", ["prefix", "ptuning"])
def test_prompt_encoder_resumes_exactly(tmp_path, tiny_model, tiny_chat_data, name):
    """A prompt-learning adapter with an encoder (prefix projection, P-tuning's MLP) saves the virtual tokens the
    encoder computes, not the encoder: a resume from its checkpoint failed on the shapes (prefix) or silently trained
    on from another model (P-tuning). Stopped at step 3 and resumed, the run follows the uninterrupted one."""
    from conftest import StopAt

    def config(run):
        cfg = {"model": {"source": tiny_model}, "data": {"train": tiny_chat_data, "max_length": 64},
               "adapter": ADAPTERS[name],
               "training": {"max_steps": 6, "batch_size": 4, "learning_rate": LEARNING_RATES[name], "save_steps": 3,
                            "precision": "fp32"},
               "output": {"dir": str(tmp_path / "runs"), "name": run}}
        path = tmp_path / f"{run}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return load_config(path)

    full = run_training(config("full"), show_progress=False)
    run_training(config("split"), callbacks=[StopAt(3)], show_progress=False)
    split = tmp_path / "runs" / "split"
    (split / "summary.json").unlink()
    second = run_training(config("split"), show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-3")
    a, b = losses(Path(full["run"])), losses(split)
    assert len(a) == len(b) == 6 and all(abs(x - y) <= 1e-6 for x, y in zip(a, b)), (a, b)
