"""Kahneman-Tversky Optimization (KTO): alignment from replies marked only good or bad, no pairs needed.

Each reply is labelled desirable or undesirable; the loss pushes the implicit reward (log-probability ratio against
a frozen reference model, scaled by `beta`) of desirable replies above, and of undesirable ones below, a baseline
estimated from the batch's KL divergence to the reference. Data may be unpaired {prompt, completion, label} or
preference pairs (each pair gives one desirable and one undesirable example).
Paper: Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306. Reference: TRL KTOTrainer.

The reference costs no second copy of the weights, as in DPO (see methods/dpo.py).
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.methods.preference import PreferenceMethod, dataset, reference, use_disabled_adapter_as_reference


class Config(BaseModel):
    """Options of `method: {name: kto, ...}`."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="kto, or the unpaired APO-zero loss")
    desirable_weight: float = Field(1.0, gt=0, description="weight of desirable examples (raise it when they are "
                                    "fewer: the paper keeps desirable_weight*n_desirable / undesirable_weight*"
                                    "n_undesirable between 1 and 4/3)")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of undesirable examples")
    precompute_ref_log_probs: bool | None = Field(
        None, description="None = on for full fine-tuning (no second model in memory), off with an adapter")


def apart(rows: list[dict], seed: int) -> list[dict]:
    """Rows in a seeded random order. The KL baseline scores each prompt with its batch neighbour's completion, meant
    to be unrelated; a preference pair arrives as its desirable and undesirable halves side by side, which would pair
    half the prompts with their own other reply."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


class KTO(PreferenceMethod):
    """Unpaired examples (one sequence a row); the full logits and the reference forward as DPO."""

    Config = Config
    data = "kto"
    sequences_per_row = 1
    reference_forward = True
    reported = (*PreferenceMethod.reported, "eval_kl", "eval_entropy", "eval_num_tokens")

    def forward_only_passes(self, opts: Config) -> int:
        """The reference's forward, and with the `kto` loss the KL baseline's: TRL scores each batch's mismatched
        prompt/completion pairs with the policy and the reference (no backward), as many tokens again."""
        return 3 if opts.loss_type == "kto" else 1

    def late_reference_passes(self, opts: Config, ctx) -> int:
        """TRL's KTO trainer runs the reference after the policy's forward over the batch, and with the `kto` loss
        over the KL pairs too."""
        return 2 if opts.loss_type == "kto" else 1

    def check(self, cfg, opts: Config, data) -> None:
        labels = {row["label"] for row in data.train}
        if labels != {True, False} and opts.loss_type == "kto":
            kind = "desirable" if True in labels else "undesirable"
            raise UserError(f"KTO needs both desirable and undesirable examples, but every training example is {kind}; "
                            "add examples with the other label (or use preference pairs)")
        if opts.loss_type == "kto" and cfg.training.batch_size < 2:
            raise UserError("KTO estimates its KL baseline from mismatched pairs within a batch: set "
                            "training.batch_size to 2 or more")

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from trl import KTOConfig, KTOTrainer

        kto_args = KTOConfig(
            # the KL baseline pairs each example with its neighbour in a fixed-order batch, so batches must not be
            # shuffled or regrouped (TRL refuses other samplers); `apart` has already put the rows in a seeded
            # random order
            **{**args, "train_sampling_strategy": "sequential" if opts.loss_type == "kto" else "random"},
            max_length=cfg.data.max_length,
            beta=opts.beta,
            loss_type=opts.loss_type,
            desirable_weight=opts.desirable_weight,
            undesirable_weight=opts.undesirable_weight,
            **reference(cfg, opts.precompute_ref_log_probs),
        )
        trainer = KTOTrainer(
            model=model,
            ref_model=None,
            args=kto_args,
            train_dataset=dataset(apart(data.train, cfg.data.seed)),
            eval_dataset=dataset(apart(data.validation, cfg.data.seed)),
            processing_class=tokenizer,
        )
        use_disabled_adapter_as_reference(trainer, cfg)
        return trainer


METHOD = KTO()
