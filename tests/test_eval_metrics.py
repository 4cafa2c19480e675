"""`eval.metric` is checked against what the method's evaluation reports, before anything loads: every metric each
method logs at an evaluation is accepted, the names it declares are logged, and a typo, another method's metric or
a task metric without its task is refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab import cli, load_config, methods
from tunelab.errors import UserError
from tunelab.evaluation.selection import natural_direction
from tunelab.train import check_metric, evaluation_settings, run_training

PAIRS = [("Write a greeting.", "Hello there!", "go away"), ("What is 2+2?", "4.", "5."),
         ("Name a color.", "Blue.", "Seven."), ("Is ice cold?", "Yes.", "No.")]
# the Trainer's timing entries come with every evaluation; they are no quality to keep the best checkpoint by
TIMING = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("metric-data")
    rows = {
        "conversation": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                         for p, c, _ in PAIRS * 2],
        "preference": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS * 2],
        "kto": [{"prompt": p, "completion": c if i % 2 else r, "label": bool(i % 2)}
                for i, (p, c, r) in enumerate(PAIRS * 2)],
    }
    rows["prompt"] = rows["conversation"]
    out = {}
    for kind, items in rows.items():
        path = root / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        out[kind] = str(path)
    return out


def config(tmp_path, model, data, method: dict, **eval_section) -> Path:
    cfg = {"model": {"source": model}, "data": {"train": data, "max_length": 48, "val_split": 0.25},
           "method": method, "adapter": {"type": "lora", "r": 4, "alpha": 8},
           "training": {"max_steps": 1, "batch_size": 2, "eval_steps": 1, "save_steps": 1, "precision": "fp32"},
           "eval": eval_section, "output": {"dir": str(tmp_path / "runs"), "name": "m"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def method_entry(name: str, tiny_model: str) -> dict:
    return {"sft": {"name": "sft", "loss": "fused"},  # TRL's head: token accuracy and entropy besides the loss
            "grpo": {"name": "grpo", "rewards": ["format"], "num_generations": 2, "max_completion_length": 4},
            "ppo": {"name": "ppo", "rewards": ["format"], "max_completion_length": 4},
            "distill": {"name": "distill", "teacher": tiny_model}}.get(name, {"name": name})


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_what_each_method_logs_at_evaluation_is_what_it_declares(tmp_path, tiny_model, data, name):
    method = methods.get(name)
    path = config(tmp_path, tiny_model, data[method.data], method_entry(name, tiny_model))
    declared = method.eval_metrics(method.options(load_config(path).method.options()))
    # the best checkpoint is kept by a metric of the method's own where it has one (the Trainer reads it from what
    # evaluate() returns, which for some trainers is not all that is logged)
    own = next((m for m in declared if not m.endswith("/") and m != "eval_loss"), "eval_loss")
    side = natural_direction(own) or "min"  # KTO's eval_kl has no better side by its name: it is given
    summary = run_training(load_config(path, [f"eval.metric={own}", f"eval.direction={side}"]), show_progress=False,
                           echo=lambda *a: None)
    assert set(summary["best_metric"]) == {own}, summary.get("best_metric")
    logged = {k for r in map(json.loads, (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines())
              for k in r if k.startswith("eval_")} - TIMING
    assert logged, "no evaluation was logged"
    for metric in logged:  # each one may be the best checkpoint's metric, with a side where its name gives none
        check_metric(load_config(path, [f"eval.metric={metric}", "eval.direction=max"]))
        if natural_direction(metric) is None:
            with pytest.raises(UserError, match="has no better side by its name"):
                check_metric(load_config(path, [f"eval.metric={metric}"]))
        else:
            check_metric(load_config(path, [f"eval.metric={metric}"]))
    names = {m for m in declared if not m.endswith("/")}
    assert names <= logged, f"declared but never logged: {names - logged}"
    families = [m for m in declared if m.endswith("/")]
    assert all(any(k.startswith(f) for k in logged) for f in families), (families, logged)


def test_sft_token_accuracy_needs_trls_head(tmp_path, tiny_model, data):
    path = config(tmp_path, tiny_model, data["conversation"], {"name": "sft"}, metric="eval_mean_token_accuracy")
    with pytest.raises(UserError, match="reports eval_loss:"):  # the lean loss (default here) computes no accuracy
        evaluation_settings(load_config(path))
    assert evaluation_settings(load_config(path, ["method.loss=fused"]))["metric_for_best_model"] == \
        "eval_mean_token_accuracy"


@pytest.mark.parametrize("method, metric, says", [
    ({"name": "sft"}, "eval_los", "did you mean 'eval_loss'"),
    ({"name": "sft"}, "eval_rewards/accuracies", "not reported by method 'sft'"),
    ({"name": "sft"}, "gsm8k_accuracy", "it needs eval.task=gsm8k"),
    ({"name": "ppo", "rewards": ["format"]}, "eval_loss", "eval.metric=eval_reward"),
    ({"name": "dpo"}, "eval_rewards/", "not reported"),  # a family is not a metric
])
def test_a_metric_the_run_never_reports_is_refused_before_anything_loads(tmp_path, tiny_model, data, method,
                                                                         metric, says):
    kind = methods.get(method["name"]).data
    path = config(tmp_path, tiny_model, data[kind], method, metric=metric)
    with pytest.raises(UserError, match=says):
        evaluation_settings(load_config(path))


@pytest.mark.parametrize("method, metric", [
    ({"name": "dpo"}, "rewards/accuracies"),  # the eval_ prefix may be left out, as in TrainingArguments
    ({"name": "reward"}, "eval_accuracy"),
    ({"name": "sft"}, "eval_gsm8k_accuracy"),  # with eval.task=gsm8k below
])
def test_metrics_the_run_reports_are_accepted(tmp_path, tiny_model, data, method, metric):
    kind = methods.get(method["name"]).data
    path = config(tmp_path, tiny_model, data[kind], method, metric=metric, task="gsm8k")
    args = evaluation_settings(load_config(path))
    assert args["metric_for_best_model"] == (metric if metric.startswith("eval_") else f"eval_{metric}")


@pytest.mark.parametrize("kind, method, metric, says", [
    ("conversation", {"name": "sft"}, "eval_accuracy", "eval.metric 'eval_accuracy' is not reported by method 'sft'"),
    ("kto", {"name": "kto"}, "eval_kl", "eval.metric 'eval_kl' has no better side by its name"),
])
def test_the_cli_refuses_the_metric_in_one_line_and_writes_nothing(tmp_path, tiny_model, data, capsys, kind, method,
                                                                   metric, says):
    path = config(tmp_path, tiny_model, data[kind], method, metric=metric)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("metric, side", [
    ("eval_loss", "min"), ("eval_nll_loss", "min"), ("eval_gsm8k_accuracy", "max"), ("eval_gsm8k_format_rate", "max"),
    ("eval_mean_token_accuracy", "max"), ("eval_rewards/accuracies", "max"), ("eval_rewards/margins", "max"),
    ("eval_margin", "max"), ("eval_reward", "max"), ("eval_rewards/format/mean", "max"), ("eval_rewards/format", "max"),
    ("eval_log_odds_ratio", "max"), ("eval_kl", None), ("eval_entropy", None), ("eval_rewards/chosen", None),
    ("eval_rewards/rejected", None), ("eval_logps/chosen", None), ("eval_reward_std", None),
    ("eval_rewards/format/std", None), ("eval_mean_reward", None), ("eval_num_tokens", None),
    ("eval_completions/mean_length", None),
])
def test_auto_direction_follows_the_name_and_refuses_a_metric_without_a_better_side(metric, side):
    assert natural_direction(metric) == side


def test_a_metric_without_a_better_side_needs_eval_direction_before_anything_loads(tmp_path, tiny_model, data):
    path = config(tmp_path, tiny_model, data["kto"], {"name": "kto"}, metric="eval_kl")
    with pytest.raises(UserError, match="set eval.direction=min or eval.direction=max"):
        evaluation_settings(load_config(path))
    assert evaluation_settings(load_config(path, ["eval.direction=min"]))["greater_is_better"] is False
    assert evaluation_settings(load_config(path, ["eval.metric=eval_rewards/margins"]))["greater_is_better"] is True
