"""Which side of an evaluation metric is better, and the Trainer's arguments for keeping the best checkpoint by it.

Names only, no torch or transformers: config checks (train, sweep) use them before any library loads, so a mistake
in eval.metric or search.objective is reported at once.
"""

from __future__ import annotations

# what the task metric adds to an evaluation's entry, after its prefix (eval_gsm8k_accuracy, eval_gsm8k_format_rate)
TASK_METRICS = ("accuracy", "format_rate")

# Metrics whose better side is plain from the name alone; anything else (KL, entropy, log-probabilities, a DPO
# reward of one side, a reward model's raw scores, a spread, a length) has none, and `auto` refuses to guess.
MAXIMIZED = ("accuracy", "accuracies", "format_rate", "margin", "margins", "log_odds_ratio", "log_odds_chosen")
NO_SIDE = ("has no better side by its name (auto minimizes losses and maximizes accuracies, margins and sampled "
           "rewards)")


def eval_name(metric: str) -> str:
    """The metric as the Trainer logs it (the eval_ prefix is optional where a metric is named, as in the Trainer)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def natural_direction(metric: str) -> str | None:
    """"min" for a loss or perplexity, "max" for an accuracy, a task score, a margin or a sampled completion's reward
    (GRPO's eval_reward and eval_rewards/FUNC/mean, PPO's eval_rewards/FUNC); None where the name says neither."""
    metric = eval_name(metric)
    last = metric.rsplit("/", 1)[-1]
    if metric.endswith(("loss", "perplexity")):
        return "min"
    if metric == "eval_reward" or any(last == m or last.endswith("_" + m) for m in MAXIMIZED):
        return "max"
    if metric.startswith("eval_rewards/") and not any(w in last for w in ("chosen", "rejected", "std", "sum")):
        return "max"  # GRPO: eval_rewards/FUNC/mean; PPO: eval_rewards/FUNC (DPO's chosen/rejected have no side)
    return None


def best_model_args(metric: str = "eval_loss", direction: str | None = None) -> dict:
    """TrainingArguments fields for keeping and restoring the best checkpoint by `metric` (and early stopping on it).

    direction: "min" or "max"; by default the metric's natural_direction (losses minimized; accuracies, margins,
    sampled rewards maximized); a metric without one needs it given. Evaluation and saving must share a schedule
    (same strategy, save steps a multiple of eval steps).
    """
    metric = eval_name(metric)
    direction = direction or natural_direction(metric)
    if direction not in ("min", "max"):
        raise ValueError(f"{metric} {NO_SIDE}: give direction 'min' or 'max'")
    return {"load_best_model_at_end": True, "metric_for_best_model": metric, "greater_is_better": direction == "max"}
