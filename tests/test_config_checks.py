"""Config mistakes found before the run directory is written (one line, exit 2, nothing on disk), and the keys for
training scripts' flags reaching the TrainingArguments."""

from __future__ import annotations

import pytest
from test_train import make_config

from tunelab import cli, load_config
from tunelab.runs import open_run
from tunelab.train import training_arguments

REFUSALS = {
    # the comma form is split into names; one of them is not a module of the tiny Llama
    "targets": (["adapter.target_modules=q_proj,qv_proj"], ["adapter.target_modules", "'qv_proj'", "v_proj",
                                                            "o_proj"]),
    # a block's name, not a layer PEFT can adapt
    "target_block": (["adapter.target_modules=[q_proj, mlp]"], ["'mlp' matches no module", "gate_proj"]),
    "optimizer": (["training.optimizer=adamw_torh"], ["training.optimizer", "did you mean 'adamw_torch'"]),
    "min_lr": (["training.scheduler=cosine_with_min_lr"], ["training.scheduler_kwargs", "min_lr_rate"]),
    "wsd": (["training.scheduler=warmup_stable_decay"], ["training.scheduler_kwargs", "num_decay_steps"]),
    "scheduler_arg": (["training.scheduler_kwargs.min_lr=0.1"], ["scheduler 'linear' has no argument 'min_lr'"]),
    "resume_from": (["output.resume_from=/nonexistent/checkpoint-5"], ["output.resume_from", "not a directory"]),
    "epoch_eval_no_val": (["training.eval_strategy=epoch"], ["validation data"]),
    "best_needs_same_strategy": (["data.val_split=0.25", "training.eval_strategy=epoch"],
                                 ["training.save_strategy=epoch"]),
    # a `bool | "auto"` key: the key itself (not pydantic's per-member '...gradient_checkpointing.bool') and both forms
    "union_value": (["training.gradient_checkpointing=maybe"],
                    ["config key 'training.gradient_checkpointing': Input should be a valid boolean or 'auto'"]),
    "method_union_value": (["method.use_liger_kernel=maybe"],
                           ["config key 'method.use_liger_kernel': Input should be a valid boolean or 'auto'"]),
    # found only inside trainer.train() before: the optimizer's package is missing, a schedule argument is text
    "optimizer_package": (["training.optimizer=galore_adamw"], ["training.optimizer", "galore_torch"]),
    "schedule_free": (["training.optimizer=schedule_free_adamw"], ["training.optimizer", "schedulefree"]),
    "scheduler_text": (["training.scheduler=polynomial", "training.scheduler_kwargs={power: abc}"],
                       ["training.scheduler_kwargs", "scheduler 'polynomial' refused", "power is text"]),
    "min_lr_twice": (["training.scheduler=cosine_with_min_lr", "training.scheduler_kwargs={min_lr: 1e-5, "
                      "min_lr_rate: 0.1}"], ["min_lr or min_lr_rate, not both"]),
    "attention": (["model.attn_implementation=sdpaa"], ["model.attn_implementation", "did you mean 'sdpa'"]),
    # a run name that is not one folder inside output.dir (the run directory --overwrite may delete)
    "name_dot": (["output.name=."], ["config key 'output.name'", "one folder name"]),
    "name_up": (["output.name=.."], ["config key 'output.name'", "one folder name"]),
    "name_path": (["output.name=x/../.."], ["config key 'output.name'"]),
    "name_absolute": (["output.name=/tmp"], ["config key 'output.name'"]),
    "key_under_value": (["training=x", "training.learning_rate=1"], ["'training' is set to 'x', not a section"]),
    # a local path that is not there (the hub would only have refused the id's form), or is not a model directory
    "model_path": (["model.source=/nonexistent/model"], ["config key 'model.source'", "/nonexistent/model not found"]),
    "model_dir": (["model.source=."], ["config key 'model.source'", "has no config.json"]),
    # 0 trained one step and reported the run complete
    "max_steps_0": (["training.max_steps=0"], ["config key 'training.max_steps'", "-1 to train for training.epochs"]),
    "epochs_inf": (["training.max_steps=-1", "training.epochs=inf"], ["config key 'training.epochs'", "finite"]),
    "prefix_checkpointing": (["adapter.type=prefix", "training.gradient_checkpointing=true"],
                             ["training.gradient_checkpointing=true does not run with adapter.type=prefix"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_mistakes_are_refused_before_the_run_directory(tmp_path, tiny_model, tiny_chat_data, capsys, case):
    overrides, expected = REFUSALS[case]
    path = make_config(tmp_path, tiny_model, tiny_chat_data, training={"max_steps": 1})
    assert cli.main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "runs").exists()


def test_resume_from_a_different_adapter_is_refused(tmp_path, tiny_model, tiny_chat_data, capsys):
    from tunelab.train import run_training

    src = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "src",
                                               training={"max_steps": 2, "save_steps": 2})), show_progress=False)
    ckpt = f"{src['run']}/checkpoints/checkpoint-2"
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "other", adapter={"r": 4},
                       output={"resume_from": ckpt})
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "output.resume_from" in err and "adapter.r" in err
    assert not (tmp_path / "runs" / "other").exists()
    # not a checkpoint: the run directory itself
    assert cli.main(["train", str(path), f"output.resume_from={src['run']}", "adapter.r=8"]) == 2
    assert "trainer_state.json" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "other").exists()


def test_seed_flags_reach_training_arguments(tmp_path, tiny_model, tiny_chat_data):
    from transformers import TrainingArguments

    training = {"eval_batch_size": 3, "scheduler": "cosine_with_min_lr", "scheduler_kwargs": {"min_lr_rate": 0.1},
                "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "label_smoothing": 0.1,
                "torch_compile": True, "eval_strategy": "epoch", "save_strategy": "epoch", "optimizer": "sgd"}
    cfg = load_config(make_config(tmp_path, tiny_model, tiny_chat_data, training=training), ["data.val_split=0.25"])
    args = TrainingArguments(**training_arguments(cfg, open_run(cfg), "fp32"))
    assert args.per_device_train_batch_size == 4 and args.per_device_eval_batch_size == 3
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.8, 0.95, 1e-6)
    assert args.label_smoothing_factor == 0.1 and args.torch_compile and args.optim == "sgd"
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    # defaults: eval batch = train batch, TrainingArguments' Adam settings, steps
    cfg = load_config(make_config(tmp_path, tiny_model, tiny_chat_data))
    args = TrainingArguments(**training_arguments(cfg, open_run(cfg), "fp32"))
    assert args.per_device_eval_batch_size == 4 and args.eval_strategy == "no" and args.save_strategy == "steps"
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.label_smoothing_factor) == (0.9, 0.999, 1e-8, 0)
    assert not (tmp_path / "runs").exists()


def test_comma_targets_and_min_lr_schedule_train(tmp_path, tiny_model, tiny_chat_data):
    """The failing seed-script settings of the issue, in one short run: they train and land where they should."""
    import json
    from pathlib import Path

    from tunelab.train import run_training

    path = make_config(tmp_path, tiny_model, tiny_chat_data, adapter={"target_modules": "q_proj, v_proj"},
                       training={"max_steps": 4, "scheduler": "cosine_with_min_lr",
                                 "scheduler_kwargs": {"min_lr_rate": 0.5}, "label_smoothing": 0.1})
    summary = run_training(load_config(path), show_progress=False)
    assert summary["status"] == "complete"
    adapter = json.loads((Path(summary["final"]) / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    lrs = [json.loads(x).get("learning_rate") for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert min(x for x in lrs if x) >= 0.5 * 5e-3 - 1e-9  # the schedule's floor: min_lr_rate x learning_rate


def test_flash_attention_without_its_package_is_one_line(tmp_path, tiny_model, tiny_chat_data, capsys):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash_attn is installed here")
    path = make_config(tmp_path, tiny_model, tiny_chat_data, training={"max_steps": 1})
    assert cli.main(["train", str(path), "model.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flash_attn package" in err, err
    assert not (tmp_path / "runs").exists()


def test_target_modules_may_be_path_suffixes_as_peft_matches_them(tmp_path, tiny_model, tiny_chat_data):
    from transformers import AutoModelForCausalLM

    from tunelab.checks import check_target_modules
    from tunelab.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    path = make_config(tmp_path, tiny_model, tiny_chat_data)
    check_target_modules(load_config(path, ["adapter.target_modules=self_attn.q_proj,self_attn.v_proj"]), model)
    check_target_modules(load_config(path, ["adapter.target_modules=layers.0.self_attn.q_proj"]), model)
    for wrong in ("mlp.q_proj", "attn.q_proj"):  # a suffix must end at a dot: 'attn.q_proj' is not 'self_attn.q_proj'
        with pytest.raises(UserError, match=f"'{wrong}' matches no module"):
            check_target_modules(load_config(path, [f"adapter.target_modules={wrong}"]), model)


# Mistakes in the config's own keys and values: found before torch, transformers or PEFT are imported (seconds on a
# small machine), so such a refusal answers at once.
LIGHT_REFUSALS = {
    "unknown_key": ["training.bogus=1"],
    "union_value": ["training.gradient_checkpointing=maybe"],
    "run_name": ["output.name=.."],
    "model_path": ["model.source=./nonexistent"],
    "tracker": ["training.report_to=wandbx"],
    "neftune": ["method.neftune_noise_alpha=-1"],  # else the first step's noise crashes
    "method_adapter": ["method.name=ppo", "adapter.type=prefix"],
    "eval_metric": ["data.val_split=0.25", "training.eval_steps=5", "eval.load_best=true", "eval.metric=eval_bogus"],
    "best_needs_same_strategy": ["data.val_split=0.25", "training.eval_strategy=epoch"],
}
NO_LIBRARIES = """
import sys
from tunelab import cli
for overrides in {cases!r}:
    assert cli.main(["train", {path!r}, *overrides]) == 2, overrides
loaded = [m for m in ("torch", "transformers", "peft", "trl", "datasets") if m in sys.modules]
print("loaded:", loaded)
"""


def test_config_mistakes_are_refused_before_any_library_loads(tmp_path, tiny_model, tiny_chat_data):
    import subprocess
    import sys

    path = make_config(tmp_path, tiny_model, tiny_chat_data, training={"max_steps": 1})
    code = NO_LIBRARIES.format(cases=list(LIGHT_REFUSALS.values()), path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(LIGHT_REFUSALS), out.stderr
    assert "loaded: []" in out.stdout, out.stdout
    assert not (tmp_path / "runs").exists()


def test_a_model_source_is_a_local_directory_or_a_hub_id(tmp_path, tiny_model):
    from tunelab.errors import UserError
    from tunelab.models import check_source, resolve_source

    assert resolve_source(str(tiny_model)) == str(tiny_model)
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):  # looked up when they load (test_hub_cache)
        check_source(hub_id)
    for missing in (tmp_path / "missing", "./missing", "~/missing/model", "a/b/c"):
        with pytest.raises(UserError, match="not found"):
            resolve_source(str(missing))
