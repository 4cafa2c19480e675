"""Simple Preference Optimization (SimPO): a reference-free preference loss on length-normalized log-probabilities.

The implicit reward of a reply is its average per-token log-probability scaled by `beta`; the loss asks the chosen
reply's reward to beat the rejected one's by a margin `gamma`. Averaging over tokens removes DPO's bias towards long
replies, and without a reference model there is no second copy of the weights and no reference forward pass.
Paper: Meng et al. 2024, https://arxiv.org/abs/2405.14734. Reference: TRL `trl.experimental.cpo.CPOTrainer` with
`loss_type="simpo"` and `cpo_alpha=0` (CPO's behaviour-cloning term off), as the TRL docs describe.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunelab.methods.preference import PreferenceMethod, counting_pair_tokens, pair_trainer


class Config(BaseModel):
    """Options of `method: {name: simpo, ...}`. Defaults follow the SimPO paper, not TRL's CPO (beta 0.1, gamma 0.5)."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(2.0, gt=0, description="reward scale (paper: 2.0-2.5; TRL CPO default 0.1)")
    gamma: float = Field(1.0, ge=0, description="target reward margin (TRL: simpo_gamma, default 0.5); the paper "
                         "keeps gamma/beta around 0.5-0.8")
    cpo_alpha: float = Field(0.0, ge=0, description="weight of an SFT term on the chosen reply (0 = pure SimPO; "
                             "> 0 mixes in CPO's behaviour cloning)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed rate of flipped preference labels")


class SimPO(PreferenceMethod):
    Config = Config
    # prompt tuning and P-tuning put their virtual tokens before the pair's tokens, which TRL's CPOTrainer does not count
    # in its labels (a shape mismatch); prefix tuning keeps the sequence length
    adapters = ("none", "lora", "dora", "ia3", "prefix")
    loss_head = "logits"  # TRL's CPOTrainer: full logits, selective_log_softmax
    reported = (*PreferenceMethod.reported, "eval_nll_loss")

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        simpo_args = CPOConfig(
            **args,
            max_length=cfg.data.max_length,
            loss_type="simpo",
            beta=opts.beta,
            simpo_gamma=opts.gamma,
            cpo_alpha=opts.cpo_alpha,
            label_smoothing=opts.label_smoothing,
        )
        return pair_trainer(counting_pair_tokens(CPOTrainer), model, simpo_args, data, tokenizer)


METHOD = SimPO()
