"""Direct Preference Optimization (DPO): learn from preference pairs without a reward model or sampling.

The loss raises the policy's log-probability of the chosen reply over the rejected one, measured relative to a frozen
reference model (the starting point); `beta` sets how far the policy may move from it. Other loss types from the
literature share the trainer: IPO, hinge (SLiC), robust, EXO, NCA, BCO, APO, ...
Paper: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290. Reference: TRL DPOTrainer.

The reference model costs no second copy of the weights: with an adapter it is the base model with the adapter
switched off; with full fine-tuning its log-probabilities are computed once before training
(methods/preference.reference).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.methods.preference import (PreferenceMethod, pair_trainer, precomputes_reference, reference,
                                         use_disabled_adapter_as_reference)

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


class DPO(PreferenceMethod):
    Config = Config
    reference_forward = True  # the reference model's forward (no backward) on the same tokens
    reported = (*PreferenceMethod.reported, "eval_mean_token_accuracy", "eval_entropy", "eval_num_tokens")

    def late_reference_passes(self, opts: Config, ctx) -> int:
        """TRL's DPO trainer runs the reference after the policy's forward, unless its log-probs are precomputed
        (precompute_ref_log_probs; by default with full fine-tuning: preference.precomputes_reference)."""
        return 0 if precomputes_reference(ctx.adapter, opts.precompute_ref_log_probs) else 1

    def check(self, cfg, opts: Config, data) -> None:
        losses = opts.loss_type if isinstance(opts.loss_type, list) else [opts.loss_type]
        if opts.loss_weights is not None and len(opts.loss_weights) != len(losses):
            raise UserError(f"method.loss_weights has {len(opts.loss_weights)} weights for {len(losses)} loss types "
                            f"({', '.join(losses)}); give one weight per loss type")

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from trl import DPOConfig, DPOTrainer

        losses = opts.loss_type if isinstance(opts.loss_type, list) else [opts.loss_type]
        dpo_args = DPOConfig(
            **args,
            max_length=cfg.data.max_length,
            beta=opts.beta,
            loss_type=losses,
            loss_weights=opts.loss_weights,
            label_smoothing=opts.label_smoothing,
            **reference(cfg, opts.precompute_ref_log_probs),
        )
        trainer = pair_trainer(DPOTrainer, model, dpo_args, data, tokenizer, ref_model=None)
        use_disabled_adapter_as_reference(trainer, cfg)
        return trainer


METHOD = DPO()
