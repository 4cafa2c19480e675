"""Odds Ratio Preference Optimization (ORPO): supervised fine-tuning and preference alignment in one loss.

The loss is the usual next-token loss on the chosen reply plus `beta` (the paper's lambda) times a penalty on the
log odds ratio between chosen and rejected replies. No reference model is needed at all, so no second copy of the
weights and no reference forward pass.
Paper: Hong et al. 2024, https://arxiv.org/abs/2403.07691. Reference: TRL `trl.experimental.orpo.ORPOTrainer`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.methods.preference import PreferenceMethod, counting_pair_tokens, pair_trainer


class Config(BaseModel):
    """Options of `method: {name: orpo, ...}`."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term against the SFT loss (paper: lambda)")


class ORPO(PreferenceMethod):
    Config = Config
    # prompt tuning and P-tuning put their virtual tokens before the pair's tokens, which TRL's ORPOTrainer does not count
    # in its labels (a shape mismatch); prefix tuning keeps the sequence length
    adapters = ("none", "lora", "dora", "ia3", "prefix")
    loss_head = "logits"  # TRL's ORPOTrainer: full logits, selective_log_softmax
    reported = (*PreferenceMethod.reported, "eval_nll_loss", "eval_log_odds_ratio", "eval_log_odds_chosen")

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        orpo_args = ORPOConfig(**args, max_length=cfg.data.max_length, beta=opts.beta)
        return pair_trainer(counting_pair_tokens(ORPOTrainer), model, orpo_args, data, tokenizer)


METHOD = ORPO()
