"""The lean causal-LM loss, shared by SFT and sequence distillation (both train on the data layer's labels).

TRL 1.16 computes the loss through a chunked "fused" LM head that projects *every* position through the vocabulary
(off Triton devices), recomputes the logits in backward and adds entropy and top-1 accuracy on every step. The lean
loss runs the body once, projects only the positions whose next token is trained (about half of a chat sample is
system/user text) and takes plain cross-entropy on them: the same value, normalized the same way
(`num_items_in_batch`), without the extra work. Right-padded batches also drop their attention mask, so SDPA runs its
causal kernel with no mask tensor. It is a subclass of SFTTrainer, so checkpoints, resume, logging and evaluation
stay TRL's; `trainer.lean = False` falls back to TRL's own loss.
"""

from __future__ import annotations


def lean_loss_supported(model, accelerator) -> bool:
    """The lean loss calls the model's decoder and LM head directly, which only works for a single process and for
    adapters that do not prepend virtual tokens (prefix/prompt/P-tuning change the inputs inside PEFT's forward)."""
    if accelerator.num_processes != 1:
        return False
    cfg = getattr(model, "active_peft_config", None)
    return not (cfg is not None and cfg.is_prompt_learning)


def right_padded(mask) -> bool:
    """True when each row of the attention mask is ones followed by zeros (padding only on the right)."""
    import torch

    if mask is None or mask.dim() != 2:
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def casts_inputs(model) -> bool:
    """Whether every adapter layer has PEFT's input-cast switch: LoRA-family layers do, IA3's do not (and PEFT's
    disable_input_dtype_casting fails on them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return all(hasattr(m, "cast_input_dtype_enabled") for m in model.modules() if isinstance(m, BaseTunerLayer))


def lean_trainer_class():
    import torch
    from peft.helpers import disable_input_dtype_casting
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss scores only the positions with a trained next token (see the module docstring)."""

        lean = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (not self.lean or return_outputs or "shift_labels" in inputs or self.compute_loss_func is not None
                    or self.label_smoother is not None or self.args.loss_type != "nll"
                    or not lean_loss_supported(model, self.accelerator)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            labels = inputs["labels"]
            features = {k: v for k, v in inputs.items() if k != "labels"}
            if "position_ids" not in features and right_padded(features.get("attention_mask")):
                # causal attention over a right-padded row: every position a real token attends to is real, so the
                # padding mask changes nothing the loss reads; without it SDPA runs its causal kernel with no mask
                # tensor (CPU step 6% faster; float32 gradients equal to 1e-5)
                del features["attention_mask"]
            # The decoder and head are called directly, around the forward that accelerate wrapped in autocast, so
            # mixed precision has to be entered here (without it the CPU matmuls ran in float32, 3x slower). Under
            # autocast PEFT's cast of each adapter input to float32 is only undone again by the matmul: skip it.
            # Not with gradient checkpointing: its recompute runs in backward, outside this context, where PEFT casts
            # again, and the recomputed tensors' dtypes would no longer match the forward's (a CheckpointError).
            skip_casts = ((self.args.bf16 or self.args.fp16) and not self.args.gradient_checkpointing
                          and casts_inputs(model))
            with self.accelerator.autocast(), disable_input_dtype_casting(model, active=skip_casts):
                hidden = causal_lm.get_decoder()(**features, use_cache=False).last_hidden_state
                targets = labels[:, 1:]
                trained = targets != -100
                logits = causal_lm.get_output_embeddings()(hidden[:, :-1][trained])
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets[trained], reduction="sum")
            count = trained.sum() if num_items_in_batch is None else num_items_in_batch
            loss = loss_sum / torch.as_tensor(count, device=loss_sum.device).clamp(min=1)
            if self.model.training:  # the `num_tokens` log entry, as SFTTrainer keeps it
                seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
                self._total_train_tokens += int(seen)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _track_num_input_tokens(self, inputs):
            # A padding-free batch is one row with no attention mask; the Trainer then counts the ids that differ
            # from the pad id, which skips every end-of-turn token of a model whose pad is its end-of-turn token
            # (SmolLM2). Every position of such a row is a real token (no pad_to_multiple_of is set).
            if "attention_mask" not in inputs and "position_ids" in inputs and self.args.padding_free:
                inputs = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
            return super()._track_num_input_tokens(inputs)

    return LeanSFTTrainer


