"""Parts shared by the preference methods (DPO, ORPO, SimPO, KTO, reward model): their data, sampling, token
counting, the free reference model, and what they hold in memory.
"""

from __future__ import annotations

from tunelab.adapters import ADAPTERS
from tunelab.methods.contract import TRL_HEAD_TILE, EstimateContext, Method


class PreferenceMethod(Method):
    """A method trained on preference pairs: chosen and rejected run through one forward (two sequences a row), and
    TRL's preference trainers take log-probs over every position of the full (tokens x vocabulary) logits."""

    data = "preference"
    sequences_per_row = 2
    # what TRL's preference trainers report at evaluation besides the loss: the implicit rewards (eval_rewards/
    # accuracies, margins, ...), log-probs and mean logits of the chosen and rejected replies, and their own extras
    reported: tuple[str, ...] = ("eval_loss", "eval_rewards/", "eval_logps/", "eval_logits/")
    # On CPU their resident peak over a whole run outgrows the others' (estimate.CPU_RUN_GROWTH): the full logits of
    # pairs of changing lengths leave glibc's heap with more freed blocks it keeps, and their first steps already run
    # ~1.2 over the estimate. Measured over hh-rlhf in bf16 (benchmarks/RESULTS.md, "A whole run's memory on CPU"):
    # ORPO 1.64 of the estimate, DPO 1.51 (a float32 SimPO run: 1.07).
    cpu_run_growth = 1.70

    def eval_metrics(self, opts) -> tuple[str, ...]:
        return self.reported

    def late_reference_passes(self, opts, ctx: EstimateContext) -> int:
        """Reference passes TRL runs after the policy's forward, while the policy's activations are held: none."""
        return 0

    def loss_memory(self, opts, ctx: EstimateContext) -> float | None:
        """The logits in the compute dtype, their float32 copy, the log-softmax and its gradient (DPO on hh-rlhf,
        2 x 4 x 512 tokens: ~13.5 bytes per logit measured, 14 derived), and on CPU about a tile of TRL's chunked head
        (4,096 positions x 32,768 logits, ~10 B each) more for each reference pass that runs after the policy's
        forward (late_reference_passes). Fitted on configs/preference/kto-hh.yaml, whose trainer runs one or two such
        passes (1.43 and 1.19 of the estimate without it; 1.03 with); DPO's runs one since TRL 1.16 (1.26 of the
        estimate without it at its longest batch, the first of a length-grouped run)."""
        memory = ctx.peak_tokens * ctx.arch["vocab"] * ((2 if ctx.precision != "fp32" else 4) + 4 + 4 + 4)
        if not ctx.gpu:
            tile = min(ctx.peak_tokens, TRL_HEAD_TILE[0]) * min(ctx.arch["vocab"], TRL_HEAD_TILE[1]) * 10
            memory += tile * self.late_reference_passes(opts, ctx)
        return memory


def reference(cfg, precompute: bool | None) -> dict:
    """TRL arguments that make the reference model free.

    With an adapter, TRL takes the reference from the same PeftModel. Full fine-tuning would otherwise load a second
    copy of the model; precomputing the reference log-probs with the model itself before the first step avoids it
    (exact on resume too: they are computed at start-up, before the checkpoint's weights are restored).
    """
    return {"precompute_ref_log_probs": precomputes_reference(cfg.adapter, precompute)}


def precomputes_reference(adapter, precompute: bool | None) -> bool:
    """Whether the reference log-probs are computed once before training: as asked, else with full fine-tuning."""
    return ADAPTERS[adapter.type].trains_base if precompute is None else precompute


def groups_pairs(kind: str, training) -> bool:
    """Whether a method's rows are pairs that pair_trainer groups by length (training.group_by_length); KTO's
    examples keep the order its trainer needs, and prompts (GRPO, PPO) are drawn at random."""
    return kind == "preference" and training.group_by_length


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


# Tokenized pair columns as TRL's preference trainers keep them: DPO the prompt apart from each reply (its collator
# joins them), the reward, ORPO and CPO/SimPO trainers whole sequences (prompt included) per side
PROMPT_COLUMNS = ("prompt_ids",)
SIDE_COLUMNS = ("chosen_ids", "rejected_ids", "chosen_input_ids", "rejected_input_ids")


def pair_lengths(trainer) -> None:
    """Give the trainer's tokenized pairs a length column, so that training.group_by_length groups them.

    transformers' length-grouped sampler measures a row by `input_ids`, which tokenized pairs lack, or by the column
    named by `length_column_name`. A pair's length is its longer side's (prompt included, capped at max_length where
    the trainer truncates): what its batch is padded to. Grouped, a batch of pairs pads to about its own length
    instead of the longest of a random draw (hh-rlhf pairs in batches of 8: ~44% of the padded tokens are real), and
    the sampler puts the batch with the longest pair first, so a run that would run out of memory does so at its first
    step. Written here because no TRL preference trainer records it; pyarrow counts the lists without reading them.
    """
    import pyarrow.compute as pc
    from datasets import Dataset

    name, cap = trainer.args.length_column_name, getattr(trainer.args, "max_length", None)
    for attr in ("train_dataset", "eval_dataset"):
        ds = getattr(trainer, attr)
        if not isinstance(ds, Dataset) or name in ds.column_names:
            continue
        table = ds.with_format("arrow")[:]
        prompt = [pc.list_value_length(table[c]) for c in PROMPT_COLUMNS if c in ds.column_names]
        sides = [pc.list_value_length(table[c]) for c in SIDE_COLUMNS if c in ds.column_names]
        if not sides:  # a TRL release that names its columns otherwise: the sampler would fail on the first step
            raise RuntimeError(f"{type(trainer).__name__}'s tokenized pairs have none of the columns "
                               f"{', '.join(SIDE_COLUMNS)} (they have {', '.join(ds.column_names)}): update "
                               "methods/preference.SIDE_COLUMNS")
        longest = pc.max_element_wise(*sides)
        if prompt:
            longest = pc.add(longest, prompt[0])
        if cap:
            longest = pc.min_element_wise(longest, cap)
        setattr(trainer, attr, ds.add_column(name, longest.to_pylist()))


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
    """A TRL preference trainer on the prepared rows (training and validation), the way every method here builds it,
    its pairs grouped by length where training.group_by_length asks for it."""
    trainer = trainer_class(model=model, args=args, train_dataset=dataset(data.train),
                            eval_dataset=dataset(data.validation), processing_class=tokenizer, **kw)
    if args.train_sampling_strategy == "group_by_length":
        pair_lengths(trainer)
    return trainer
