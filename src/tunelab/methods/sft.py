"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant turns of chat data.

Works with full fine-tuning and every adapter in `adapter:` (LoRA, DoRA, QLoRA via `quantization.bits: 4`, prefix,
prompt, P-tuning, IA3). The loss mask is computed by the data layer (assistant tokens and the end-of-turn token
only), so TRL receives ready `input_ids`/`labels` and does no tokenization of its own.
Reference: TRL SFTTrainer (https://huggingface.co/docs/trl/sft_trainer).

Speed. The default `lean` loss (methods/lean.py) projects only the trained positions through the LM head instead
of TRL's fused head over every position. Measured (benchmarks/RESULTS.md): on CPU the loss had cost more than the
transformer body; on an H100 the lean loss trained 1.3-1.7x faster than the fused head, also with Liger kernels
(whose fused linear cross-entropy it then replaces). `loss: fused` keeps TRL's head, which never holds a (trained
tokens x vocabulary) logit matrix: ~1.3 GB less on a 1B model with a 128k vocabulary at batch 16.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.methods.contract import Method
from tunelab.methods.lean import lean_trainer_class


class Config(BaseModel):
    """Options of `method: {name: sft, ...}`."""

    model_config = ConfigDict(extra="forbid")
    neftune_noise_alpha: float | None = Field(None, ge=0, description="NEFTune embedding noise (off by default; "
                                              "the paper used 5 to 15)")
    use_liger_kernel: bool | Literal["auto"] = Field(
        "auto", description="Liger's fused kernels (RMSNorm, RoPE, SwiGLU; Triton, GPU only); auto: on where a CUDA "
        "device is visible and liger-kernel is installed (pip install 'tunelab[gpu]')")
    loss: Literal["auto", "lean", "fused"] = Field(
        "auto", description="lean: project only trained positions through the LM head (fastest on CPU and GPU); "
        "fused: TRL's chunked LM head with entropy/accuracy metrics (TRL's default; less memory for large "
        "vocabularies); auto: lean, or fused when the memory plan finds the run would not fit otherwise")


class SFT(Method):
    Config = Config
    activation_offloading = True  # TRL's SFTConfig.activation_offloading

    def lean_loss(self, opts: Config) -> bool:
        return opts.loss in ("auto", "lean")

    def loss_choices(self, opts: Config) -> tuple[bool, ...]:
        return (True, False) if opts.loss == "auto" else (self.lean_loss(opts),)

    def with_lean_loss(self, opts: Config, lean: bool) -> Config:
        return opts.model_copy(update={"loss": "lean" if lean else "fused"})

    def eval_metrics(self, opts: Config) -> tuple[str, ...]:
        # the lean loss computes the loss only; TRL's own head also reports token accuracy and entropy
        extra = ("eval_mean_token_accuracy", "eval_entropy", "eval_num_tokens") if opts.loss == "fused" else ()
        return ("eval_loss", *extra)

    def uses_liger(self, opts: Config, cuda: bool | None = None) -> bool:
        """Whether Liger's kernels run: `cuda` is whether the run has a CUDA device (default: this machine's)."""
        import importlib.util

        if opts.use_liger_kernel != "auto":
            return opts.use_liger_kernel
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        return cuda and importlib.util.find_spec("liger_kernel") is not None

    def check(self, cfg, opts: Config, data) -> None:
        import importlib.util

        import torch

        if opts.use_liger_kernel is True and importlib.util.find_spec("liger_kernel") is None:
            raise UserError("method.use_liger_kernel needs the liger-kernel package: pip install 'tunelab[gpu]' "
                            "(or set method.use_liger_kernel=false)")
        if opts.use_liger_kernel is True and not torch.cuda.is_available():
            raise UserError("method.use_liger_kernel: Liger's kernels are Triton GPU kernels and no CUDA device is "
                            "visible; set method.use_liger_kernel=false on this machine")

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from datasets import Dataset
        from trl import SFTConfig

        # Rows are already cut to data.max_length (or dropped, or refused) by the data layer. TRL refuses
        # padding-free batches without packing unless max_length is None, since its collator would not enforce it.
        padding_free_only = cfg.data.padding_free and not cfg.data.packing
        sft_args = SFTConfig(
            **args,
            max_length=None if padding_free_only else cfg.data.max_length,
            packing=cfg.data.packing,
            padding_free=cfg.data.padding_free,
            neftune_noise_alpha=opts.neftune_noise_alpha,
            use_liger_kernel=self.uses_liger(opts),
            activation_offloading=cfg.training.activation_offloading is True,
        )
        trainer = lean_trainer_class()(
            model=model,
            args=sft_args,
            train_dataset=Dataset.from_list(data.train),
            eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
            processing_class=tokenizer,
        )
        trainer.lean = self.lean_loss(opts)
        return trainer


METHOD = SFT()
