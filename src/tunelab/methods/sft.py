"""Supervised fine-tuning (SFT): next-token cross-entropy on the assistant turns of chat data.

Works with full fine-tuning and every adapter in `adapter:` (LoRA, DoRA, QLoRA via `quantization.bits: 4`, prefix,
prompt, P-tuning, IA3). The loss mask is computed by the data layer (assistant tokens and the end-of-turn token
only), so TRL receives ready `input_ids`/`labels` and does no tokenization of its own.
Reference: TRL SFTTrainer (https://huggingface.co/docs/trl/sft_trainer).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

KIND = "conversation"


class Config(BaseModel):
    """Options of `method: {name: sft, ...}`."""

    model_config = ConfigDict(extra="forbid")
    neftune_noise_alpha: float | None = Field(None, description="NEFTune embedding noise (off by default)")
    use_liger_kernel: bool = Field(False, description="Liger fused kernels (GPU, needs liger-kernel installed)")


def build(cfg, opts: Config, model, tokenizer, data, args: dict):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sft_args = SFTConfig(
        **args,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        padding_free=cfg.data.padding_free,
        neftune_noise_alpha=opts.neftune_noise_alpha,
        use_liger_kernel=opts.use_liger_kernel,
    )
    return SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
        processing_class=tokenizer,
    )
