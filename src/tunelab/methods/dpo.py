"""Direct Preference Optimization (DPO): learn from preference pairs without a reward model or sampling.

The loss raises the policy's log-probability of the chosen reply over the rejected one, measured relative to a frozen
reference model (the starting point); `beta` sets how far the policy may move from it. Other loss types from the
literature share the trainer: IPO, hinge (SLiC), robust, EXO, NCA, BCO, APO, ...
Paper: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290. Reference: TRL DPOTrainer.

The reference model costs no second copy of the weights: with an adapter it is the base model with the adapter
switched off; with full fine-tuning its log-probabilities are computed once before training (see `reference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

KIND = "preference"

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]


class Config(BaseModel):
    """Options of `method: {name: dpo, ...}`."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (IPO: its tau)")
    loss_type: LossType | list[LossType] = Field(
        "sigmoid", description="sigmoid = DPO, ipo, hinge, robust, ...; a list combines losses (see loss_weights)")
    loss_weights: list[float] | None = Field(None, description="weights of a list of loss types (default: all 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust DPO / EXO: assumed label-noise rate")
    precompute_ref_log_probs: bool | None = Field(
        None, description="compute the reference log-probs once before training; None = on for full fine-tuning "
        "(no second model in memory), off with an adapter (the adapter is simply switched off). TRL default: off")


def reference(cfg, opts) -> dict:
    """TRL arguments that make the reference model free.

    With an adapter, TRL takes the reference from the same PeftModel. Full fine-tuning would otherwise load a second
    copy of the model; precomputing the reference log-probs with the model itself before the first step avoids it
    (exact on resume too: they are computed at start-up, before the checkpoint's weights are restored).
    """
    precompute = opts.precompute_ref_log_probs
    if precompute is None:
        precompute = cfg.adapter.type == "none"
    return {"precompute_ref_log_probs": precompute}


def use_disabled_adapter_as_reference(trainer, cfg) -> None:
    """Make the reference the base model with the adapter switched off, instead of TRL's frozen adapter copy.

    Given a PeftModel, TRL adds a frozen "ref" copy of the adapter to serve as the reference (meant for re-training an
    adapter that already learned something). Ours is always fresh, and a fresh LoRA/DoRA/IA3 adapter is the identity,
    so that copy only equals the base model while costing memory and a duplicate `ref/` adapter in every
    checkpoint and in final/. TRL switches all adapters off for the reference when no "ref" adapter exists.
    Prompt-learning adapters (prefix, prompt, P-tuning) change the output from the start: for them the frozen copy is
    the true starting point, so it stays.
    """
    model = trainer.model
    if cfg.adapter.type in ("lora", "dora", "ia3") and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")  # keeps the trained adapter active and trainable


def pairwise_sampling(args: dict) -> dict:
    """training.group_by_length measures `input_ids`, which tokenized pairs do not have (they hold prompt, chosen and
    rejected ids apart): pairs are drawn at random instead."""
    if args.get("train_sampling_strategy") == "group_by_length":
        args = {**args, "train_sampling_strategy": "random"}
    return args


def counting_pair_tokens(trainer_class):
    """`trainer_class` (TRL's ORPO or CPO trainer) counting the real tokens it trains on. Trainer counts tokens from
    `input_ids`, which these pair batches do not have (they hold the prompt+chosen and prompt+rejected sequences
    apart), so progress and summary.json would show 0 tokens and 0 tokens/s."""
    import torch

    class PairTokens(trainer_class):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.args.include_num_input_tokens_seen != "no":
                seen = sum(inputs[k].sum() for k in ("chosen_attention_mask", "rejected_attention_mask")
                           if k in inputs)
                seen = torch.as_tensor(seen, device=self.args.device, dtype=torch.int64)
                self.state.num_input_tokens_seen += int(self.accelerator.gather(seen).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    PairTokens.__name__ = trainer_class.__name__
    return PairTokens


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows) if rows else None


def check(cfg, opts: Config, data) -> None:
    losses = opts.loss_type if isinstance(opts.loss_type, list) else [opts.loss_type]
    if opts.loss_weights is not None and len(opts.loss_weights) != len(losses):
        raise UserError(f"method.loss_weights has {len(opts.loss_weights)} weights for {len(losses)} loss types "
                        f"({', '.join(losses)}); give one weight per loss type")


def build(cfg, opts: Config, model, tokenizer, data, args: dict):
    from trl import DPOConfig, DPOTrainer

    losses = opts.loss_type if isinstance(opts.loss_type, list) else [opts.loss_type]
    dpo_args = DPOConfig(
        **pairwise_sampling(args),
        max_length=cfg.data.max_length,
        beta=opts.beta,
        loss_type=losses,
        loss_weights=opts.loss_weights,
        label_smoothing=opts.label_smoothing,
        **reference(cfg, opts),
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_args,
        train_dataset=dataset(data.train),
        eval_dataset=dataset(data.validation),
        processing_class=tokenizer,
    )
    use_disabled_adapter_as_reference(trainer, cfg)
    return trainer
