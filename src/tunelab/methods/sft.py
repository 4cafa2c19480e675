"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant turns of chat data.

Works with full fine-tuning and every adapter in `adapter:` (LoRA, DoRA, QLoRA via `quantization.bits: 4`, prefix,
prompt, P-tuning, IA3). The loss mask is computed by the data layer (assistant tokens and the end-of-turn token
only), so TRL receives ready `input_ids`/`labels` and does no tokenization of its own.
Reference: TRL SFTTrainer (https://huggingface.co/docs/trl/sft_trainer).

Speed. TRL 1.16 computes the loss through a chunked "fused" LM head that projects *every* position through the
vocabulary (off Triton devices), recomputes the logits in backward and adds entropy and top-1 accuracy on every step.
The `lean` loss runs the body once, projects only the positions whose next token is trained (about half of a chat
sample is system/user text) and takes plain cross-entropy on them: the same value, normalized the same way
(`num_items_in_batch`), without the extra work. Right-padded batches also drop their attention mask, so SDPA runs its
causal kernel with no mask tensor. It is a subclass of SFTTrainer, so checkpoints, resume, logging and evaluation stay
TRL's. Measured (benchmarks/RESULTS.md): on CPU the loss had cost more than the transformer body; on an H100 the lean
loss trained 1.3-1.7x faster than the fused head, also with Liger kernels (whose fused linear cross-entropy it then
replaces). `loss: fused` keeps TRL's head, which never holds a (trained tokens x vocabulary) logit matrix: ~1.3 GB
less on a 1B model with a 128k vocabulary at batch 16.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError

KIND = "conversation"


class Config(BaseModel):
    """Options of `method: {name: sft, ...}`."""

    model_config = ConfigDict(extra="forbid")
    neftune_noise_alpha: float | None = Field(None, description="NEFTune embedding noise (off by default)")
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (GPU, needs liger-kernel installed)")
    loss: Literal["auto", "lean", "fused"] = Field(
        "auto", description="lean: project only trained positions through the LM head (fastest on CPU and GPU); "
        "fused: TRL's chunked LM head with entropy/accuracy metrics (TRL's default; less memory for large "
        "vocabularies); auto: lean")


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


def trainer_class():
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
            mixed = self.args.bf16 or self.args.fp16
            with self.accelerator.autocast(), disable_input_dtype_casting(model, active=mixed):
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


def use_lean_loss(opts: Config) -> bool:
    return opts.loss in ("auto", "lean")


def check(cfg, opts: Config, data) -> None:
    import importlib.util

    import torch

    if opts.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise UserError("method.use_liger_kernel needs the liger-kernel package: pip install 'tunelab[gpu]' "
                        "(or set method.use_liger_kernel=false)")
    if opts.use_liger_kernel and not torch.cuda.is_available():
        raise UserError("method.use_liger_kernel: Liger's kernels are Triton GPU kernels and no CUDA device is "
                        "visible; set method.use_liger_kernel=false on this machine")


def build(cfg, opts: Config, model, tokenizer, data, args: dict):
    from datasets import Dataset
    from trl import SFTConfig

    # Rows are already cut to data.max_length (or dropped, or refused) by the data layer. TRL refuses padding-free
    # batches without packing unless max_length is None, since its collator would not enforce it.
    padding_free_only = cfg.data.padding_free and not cfg.data.packing
    sft_args = SFTConfig(
        **args,
        max_length=None if padding_free_only else cfg.data.max_length,
        packing=cfg.data.packing,
        padding_free=cfg.data.padding_free,
        neftune_noise_alpha=opts.neftune_noise_alpha,
        use_liger_kernel=opts.use_liger_kernel,
    )
    trainer = trainer_class()(
        model=model,
        args=sft_args,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
        processing_class=tokenizer,
    )
    trainer.lean = use_lean_loss(opts)
    return trainer
