"""Reward model: a sequence-classification head trained to score the chosen reply of a pair above the rejected one.

The base model gets a one-output head (`score`); the loss is the Bradley-Terry pairwise loss
-log sigmoid(r(chosen) - r(rejected)). Progress is pairwise accuracy: the share of held-out pairs whose chosen reply
scores higher (`eval_accuracy` in metrics.jsonl; give data.val_split or data.validation). The trained model serves
as a reward for GRPO/PPO through `rewards.reward_model(path)` (`{name: reward_model, path: runs/<run>/final}`),
which renders conversations with the same chat template.
Paper: Ouyang et al. 2022 (InstructGPT), https://arxiv.org/abs/2203.02155. Reference: TRL RewardTrainer.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.adapters import ADAPTERS
from tunelab.methods.preference import PreferenceMethod, pair_trainer
from tunelab.methods.standalone import restore_head_dtype


class Config(BaseModel):
    """Options of `method: {name: reward, ...}`."""

    model_config = ConfigDict(extra="forbid")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="pull scores towards mean zero (paper recommends 0.01); off by default, as in TRL")
    evaluate_at_end: bool = Field(
        True, description="score the validation pairs once more after the last step, so the run always reports "
        "its final pairwise accuracy (eval_accuracy) even without training.eval_steps")


def final_evaluation():
    from transformers import TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        """Asks the Trainer for an evaluation on the last step (it has no 'evaluate at end' setting of its own)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_evaluate = True

    return EvaluateAtEnd()


class Reward(PreferenceMethod):
    Config = Config
    # train.py loads AutoModelForSequenceClassification (num_labels=1); PEFT trains the new head in full
    task = "SEQ_CLS"
    loss_head = "score"
    # final/ holds the adapter merged into the base: rewards.reward_model and other readers load it with plain
    # transformers (checkpoints keep the adapter alone, so resume works as for every method)
    merge_final = True
    # the score head trains in full next to the adapter, so the base stays float32 on CPU (models.base_dtype)
    float32_base = True
    # its one-score head holds no logits: a whole run on CPU grows as an SFT run's (1.20-1.25 over hh-rlhf)
    cpu_run_growth = None
    # final/ is a plain sequence-classification model: only adapters that merge into the weights fit (and PEFT's
    # prefix tuning needs a KV cache the classification head's forward does not keep)
    adapters = tuple(name for name, a in ADAPTERS.items() if a.mergeable or a.trains_base)
    # TRL's RewardTrainer: pairs ranked right (accuracy), the mean score gap, and the scores' spread
    reported = ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward", "eval_min_reward",
                "eval_max_reward", "eval_num_tokens")

    def loss_memory(self, opts, ctx) -> float:
        return 0.0  # a score head: one number per sequence, no vocabulary-sized logits

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from trl import RewardConfig, RewardTrainer

        # Every token of both conversations is scored as one sequence; TRL drops pairs longer than max_length
        # (it does not truncate them), which the data layer's overlong setting counts beforehand.
        reward_args = RewardConfig(**args, max_length=cfg.data.max_length,
                                   center_rewards_coefficient=opts.center_rewards_coefficient)
        trainer = pair_trainer(RewardTrainer, model, reward_args, data, tokenizer)
        restore_head_dtype(trainer.model)  # TRL cast a quantized model's score head to bfloat16 (see there)
        if data.validation and opts.evaluate_at_end:
            trainer.add_callback(final_evaluation())
        return trainer


METHOD = Reward()
