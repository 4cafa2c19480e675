"""Parts shared by the preference methods (DPO, ORPO, SimPO, KTO, reward model): their data, sampling, token
counting, the free reference model, and what they hold in memory.
"""

from __future__ import annotations

from tunelab.adapters import ADAPTERS
from tunelab.methods.contract import EstimateContext, Method


class PreferenceMethod(Method):
    """A method trained on preference pairs: chosen and rejected run through one forward (two sequences a row), and
    TRL's preference trainers take log-probs over every position of the full (tokens x vocabulary) logits."""

    data = "preference"
    sequences_per_row = 2
    # what TRL's preference trainers report at evaluation besides the loss: the implicit rewards (eval_rewards/
    # accuracies, margins, ...), log-probs and mean logits of the chosen and rejected replies, and their own extras
    reported: tuple[str, ...] = ("eval_loss", "eval_rewards/", "eval_logps/", "eval_logits/")

    def eval_metrics(self, opts) -> tuple[str, ...]:
        return self.reported

    def loss_memory(self, opts, ctx: EstimateContext) -> float | None:
        # the logits in the compute dtype, their float32 copy, the log-softmax and its gradient (DPO on hh-rlhf,
        # 2 x 4 x 512 tokens: ~13.5 bytes per logit measured, 14 derived)
        return ctx.peak_tokens * ctx.arch["vocab"] * ((2 if ctx.precision != "fp32" else 4) + 4 + 4 + 4)


def reference(cfg, precompute: bool | None) -> dict:
    """TRL arguments that make the reference model free.

    With an adapter, TRL takes the reference from the same PeftModel. Full fine-tuning would otherwise load a second
    copy of the model; precomputing the reference log-probs with the model itself before the first step avoids it
    (exact on resume too: they are computed at start-up, before the checkpoint's weights are restored).
    """
    if precompute is None:
        precompute = ADAPTERS[cfg.adapter.type].trains_base
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
    if ADAPTERS[cfg.adapter.type].identity_at_start and "ref" in getattr(model, "peft_config", {}):
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


def pair_trainer(trainer_class, model, args, data, tokenizer, **kw):
    """A TRL preference trainer on the prepared rows (training and validation), the way every method here builds it."""
    return trainer_class(model=model, args=args, train_dataset=dataset(data.train),
                         eval_dataset=dataset(data.validation), processing_class=tokenizer, **kw)
