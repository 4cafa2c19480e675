"""Proximal Policy Optimization (PPO) for causal LMs, RLHF-style: the policy samples a completion per prompt, a reward
model or reward functions score it, a value head estimates returns, GAE turns per-token rewards (the score at the
last token, minus a KL penalty to the reference model at every token) into advantages, and clipped policy and value
losses update the policy for a few epochs over each batch of rollouts.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (https://arxiv.org/abs/1707.06347); the RLHF
recipe of Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
(https://arxiv.org/abs/2203.02155); details as in Huang et al. 2024, "The N+ Implementation Details of RLHF with
PPO" (https://arxiv.org/abs/2403.17031).

TRL 1.16 no longer ships a PPO trainer (its experimental PPO was removed), so the loop is written here, in
`ppo_core.py`, as a transformers Trainer whose training step does one PPO iteration: checkpoints, exact resume,
logging and saving stay the shared ones. The reference is the policy with its adapter disabled (LoRA/QLoRA), or a
frozen copy of the starting weights (full fine-tuning).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError
from tunelab.methods.contract import EstimateContext, Generation, Method
from tunelab.rewards import check_specs


class Config(BaseModel):
    """Options of `method: {name: ppo, ...}`. One training step = one rollout of `training.batch_size` prompts."""

    model_config = ConfigDict(extra="forbid")
    rewards: list[str | dict] = Field(
        default_factory=lambda: ["gsm8k_correct"],
        description="reward specs as in GRPO; use {name: reward_model, path: runs/<rm>/final} for a trained reward "
        "model")
    max_completion_length: int = Field(128, gt=0, description="max tokens per sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same temperature)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference, in the reward")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    num_mini_batches: int = Field(1, ge=1, description="optimizer steps per pass (rollout batch split in N)")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clipping epsilon")
    clip_range_value: float = Field(0.2, gt=0, description="value prediction clipping around the rollout values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    whiten_rewards: bool = Field(False, description="normalize scores within each rollout batch")
    missing_eos_penalty: float | None = Field(None, description="subtract this from the score of completions that "
                                              "hit max_completion_length without ending")


class PPO(Method):
    Config = Config
    data = "prompt"
    # the reference is the policy with its LoRA/DoRA adapter disabled (ppo_core), or with full fine-tuning a frozen
    # copy of the starting weights; prompt learning would change the reference itself, and IA3 is untested here
    adapters = tuple(name for name, a in ADAPTERS.items() if a.trains_base or a.lora_layers)
    reference_forward = True
    loss_head = "logits"  # ppo_core: full logits in float32, log-softmax and entropy over the completion positions
    # its own loop (ppo_core) steps the optimizer between updates and keeps a value head beside the policy (wrapped
    # in DDP on its own): DeepSpeed's engine owns the optimizer step, and FSDP would shard the policy only
    strategies = ("ddp",)

    def eval_metrics(self, opts: Config) -> tuple[str, ...]:
        # evaluation scores greedy completions of the validation prompts (ppo_core): a mean reward, no loss
        return ("eval_reward", "eval_rewards/", "eval_completions/")

    def loss_memory(self, opts: Config, ctx: EstimateContext) -> float:
        """ppo_core's loss over a mini-batch: the logits of every position in the compute dtype and their gradient,
        and over the completion positions a float32 copy, its temperature-scaled copy, the log-softmax, the entropy's
        softmax and log-softmax, and a gradient (configs/gsm8k/ppo.yaml: 3,750 MB measured, 3,025 estimated with
        the default causal LM loss's 8 B per logit)."""
        half = 2 if ctx.precision != "fp32" else 4
        completions = ctx.peak_sequences * opts.max_completion_length
        return ctx.arch["vocab"] * (ctx.peak_tokens * 2 * half + completions * 6 * 4)

    def extra_memory(self, cfg, opts: Config, ctx: EstimateContext) -> dict[str, float]:
        """The KV cache of a rollout (one completion per prompt), and with full fine-tuning the reference copy."""
        arch = ctx.arch
        seq = cfg.data.max_length + opts.max_completion_length
        memory = {"kv_cache": cfg.training.batch_size * seq * arch["layers"] * 2 * arch["kv_heads"]
                  * arch["head_dim"] * _kv_bytes(ctx)}
        if ADAPTERS[cfg.adapter.type].trains_base:
            memory["reference"] = ctx.weight_bytes(arch)
        return memory

    def generation(self, cfg, opts: Config, ctx: EstimateContext) -> Generation:
        """One rollout per step: a completion for each of the batch's prompts in one generate call, then a forward of
        the policy for the log-probs and values (the reference's is reference_forward)."""
        batch = cfg.training.batch_size
        return Generation(sequences=batch, batch=batch, new_tokens=opts.max_completion_length, kv_bytes=_kv_bytes(ctx),
                          scoring_forwards=1)

    def micro_batches(self, opts: Config) -> int:
        return opts.num_mini_batches

    def training_passes(self, opts: Config) -> int:
        return opts.ppo_epochs  # each epoch runs every rollout sequence forward and backward once (in mini-batches)

    def check(self, cfg, opts: Config, data) -> None:
        """Mistakes found before the model loads or the run directory is written."""
        if not data.train:
            raise UserError("ppo: no training prompts")
        if cfg.training.grad_accum != 1:
            raise UserError("ppo: training.grad_accum must be 1 (each step is a rollout; use method.num_mini_batches "
                            "and method.ppo_epochs to split its update)")
        if cfg.training.batch_size % opts.num_mini_batches:
            raise UserError(f"ppo: training.batch_size ({cfg.training.batch_size}) must be a multiple of "
                            f"method.num_mini_batches ({opts.num_mini_batches})")
        check_specs(opts.rewards, [*data.train, *(data.validation or [])])

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from datasets import Dataset
        from transformers import TrainingArguments

        from tunelab.methods.ppo_core import PPOTrainer
        from tunelab.rewards import build_rewards

        funcs, weights = build_rewards(opts.rewards)
        # rollouts count their own tokens
        targs = TrainingArguments(**{**args, "include_num_input_tokens_seen": "no",
                                     "train_sampling_strategy": "random"})
        return PPOTrainer(model=model, args=targs, opts=opts, reward_funcs=funcs, reward_weights=weights,
                          tokenizer=tokenizer, train_dataset=Dataset.from_list(data.train),
                          eval_dataset=Dataset.from_list(data.validation) if data.validation else None)


def _kv_bytes(ctx: EstimateContext) -> int:
    return 4 if ctx.weight_dtype == "float32" else 2  # generation runs in the weights' dtype


METHOD = PPO()
