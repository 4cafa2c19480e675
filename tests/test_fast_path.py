"""The fast SFT path (lean loss) trains to the same losses as TRL's own loss and as plain TRL SFTTrainer.

No timings here: speed is measured in benchmarks/sft_throughput.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab import load_config
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


def test_lean_loss_runs_under_mixed_precision(tmp_path, tiny_model, tiny_chat_data):
    """The lean loss calls the decoder directly, outside the forward accelerate wraps in autocast: with bf16
    precision its matmuls must still run in bf16 (they silently ran in float32 once, 3x slower on CPU)."""
    import torch
    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            linear = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj.base_layer"))
            linear.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))

    settings = {**SETTINGS, "max_steps": 1, "precision": "bf16"}
    path = make_config(tmp_path, tiny_model, tiny_chat_data, name="bf16", training=settings,
                       method={"name": "sft", "loss": "lean"})
    summary = run_training(load_config(path), show_progress=False, callbacks=[Watch()])
    assert summary["status"] == "complete" and seen
    assert all(out == torch.bfloat16 for _, out in seen), seen


def test_cpu_fast_path_loads_a_bf16_base_under_float32_adapters(tmp_path, tiny_model, tiny_chat_data):
    import torch
    from transformers import TrainerCallback

    from tunelab.dropout import FastDropout

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model

    cap = Capture()
    path = make_config(tmp_path, tiny_model, tiny_chat_data, name="fast", adapter={"dropout": 0.05},
                       training={**SETTINGS, "precision": "bf16"})
    summary = run_training(load_config(path), show_progress=False, callbacks=[cap])
    params = dict(cap.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert any(isinstance(m, FastDropout) for m in cap.model.modules())
    ls = losses(Path(summary["run"]))
    assert ls[max(ls)] < ls[1] - 0.3, ls


def test_base_dtype_rules(tmp_path, tiny_model):
    from tunelab.models import base_dtype

    from tunelab import methods

    def dtype(precision="bf16", gpu=False, **sections):
        cfg = load_config(make_config(tmp_path, tiny_model, "x.jsonl", **sections))
        return base_dtype(cfg, precision, gpu, methods.get(cfg.method.name).float32_base)

    assert dtype() == "bfloat16"  # LoRA on CPU with bf16: frozen base in bf16
    assert dtype(adapter={"type": "dora"}) == "bfloat16"
    assert dtype(precision="fp32") == "float32"
    assert dtype(adapter={"type": "none"}) == dtype(adapter={"type": "none"}, gpu=True) == "float32"  # master weights
    assert dtype(adapter={"type": "ia3"}) == dtype(adapter={"type": "prefix"}) == "float32"
    assert dtype(adapter={"modules_to_save": ["lm_head"]}) == "float32"
    # a reward model's score head trains in full beside the adapter
    assert dtype(method={"name": "reward"}) == dtype(quantization={"bits": 4}) == "float32"
    assert dtype(gpu=True, adapter={"type": "ia3"}) == "bfloat16" and dtype("fp16", gpu=True) == "float16"
    assert dtype(model={"dtype": "float32"}) == "float32"  # an explicit dtype wins
    assert dtype(method={"name": "grpo"}) == "float32"  # merges the adapter to generate: exact over float32 only


def test_right_padded_detection():
    """The lean loss drops the padding mask only for right-padded batches (exact under causal attention)."""
    import torch

    from tunelab.methods.lean import right_padded

    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding needs the mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole
    assert not right_padded(None)


@pytest.mark.parametrize("loss", ["lean", "fused"])
def test_padding_free_batches_train_like_padded_batches(tmp_path, tiny_model, tiny_chat_data, loss):
    """data.padding_free concatenates a batch into one row; position ids keep the samples apart, so each step's loss
    equals the padded batch's (a sample attending to its neighbour would change it)."""
    runs, tokens = {}, {}
    for free in (False, True):
        path = make_config(tmp_path, tiny_model, tiny_chat_data, name=f"{loss}-free{free}", training=SETTINGS,
                           method={"name": "sft", "loss": loss})
        summary = run_training(load_config(path, [f"data.padding_free={str(free).lower()}"]), show_progress=False)
        assert summary["status"] == "complete"
        runs[free] = losses(Path(summary["run"]))
        tokens[free] = summary["tokens"]
    padded, free = runs[False], runs[True]
    assert tokens[True] == tokens[False]  # the same real tokens counted (tokens/s), end-of-turn tokens included
    assert free.keys() == padded.keys() and len(free) == SETTINGS["max_steps"]
    for step in free:
        assert free[step] == pytest.approx(padded[step], abs=1e-4), (step, free, padded)
    assert free[max(free)] < free[1] - 0.3


def test_liger_without_its_package_or_a_gpu_is_refused_before_the_model_loads(tmp_path, tiny_model, tiny_chat_data,
                                                                              monkeypatch):
    import importlib.util

    from tunelab.errors import UserError

    path = make_config(tmp_path, tiny_model, tiny_chat_data, name="liger", training=SETTINGS,
                       method={"name": "sft", "use_liger_kernel": True})
    loaded = []
    monkeypatch.setattr("tunelab.models.load_model", lambda *a, **k: loaded.append(1))
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(UserError, match="needs the liger-kernel package"):
            run_training(load_config(path), show_progress=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",  # as if liger-kernel were installed
                        lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        run_training(load_config(path), show_progress=False)
    assert not loaded


def test_liger_defaults_on_where_cuda_and_its_package_are_there(tmp_path, tiny_model, tiny_chat_data, monkeypatch):
    """`use_liger_kernel: auto` (the default) turns Liger on only with a CUDA device and liger-kernel installed; on a
    machine without either, a default run is not refused."""
    import importlib.util

    from tunelab.methods import sft

    opts = sft.Config()
    assert opts.use_liger_kernel == "auto"
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, _i=installed: (object() if _i else None)
                            if name == "liger_kernel" else real_find_spec(name, *a))
        for cuda in (False, True):
            monkeypatch.setattr("torch.cuda.is_available", lambda _c=cuda: _c)
            assert sft.METHOD.uses_liger(opts) is (installed and cuda)
            assert sft.METHOD.uses_liger(opts, cuda=cuda) is (installed and cuda)
        assert sft.METHOD.uses_liger(sft.Config(use_liger_kernel=False), cuda=True) is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    path = make_config(tmp_path, tiny_model, tiny_chat_data, name="auto", training={**SETTINGS, "max_steps": 1},
                       method={"name": "sft"})
    assert run_training(load_config(path), show_progress=False)["status"] == "complete"  # liger "installed", no GPU
