"""The method contract: what a training method declares and which hooks it may provide.

Every file in methods/ defines one subclass of `Method` and lists it in the table (methods/__init__.py). train.py,
estimate.py and models.py read only what is declared here; none of them names a method. A method's file reads top to
bottom: what it is (with the paper), its options (`Config`, a pydantic model rejecting unknown keys), what it declares,
and `build`, which returns a transformers Trainer (or an object with `.train()` and the Trainer's state).

Adding a method:
  1. methods/<name>.py: a docstring, `class Config(BaseModel)` with `extra="forbid"` and a description per field, and
     `class MyMethod(Method)` setting `Config` and whatever differs from the defaults below, plus `build`;
  2. one line in METHODS (methods/__init__.py), or `tunelab.methods.register("name", MyMethod())` from outside the
     package (a plugin, a test);
  3. a YAML in configs/<task>/<name>.yaml starting with the command that runs it, and a test.
Nothing else changes: the CLI, the config check, the estimate and the run directory follow the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel

from tunelab.adapters import ADAPTER_TYPES
from tunelab.errors import UserError

# What a method trains on; the data layer prepares each kind (tunelab.data.build).
DATA_KINDS = ("conversation", "preference", "kto", "prompt")


@dataclass
class EstimateContext:
    """What the memory estimate knows when it asks a method for its own share (all sizes in bytes)."""

    arch: dict  # the trained model's architecture (estimate.architecture)
    gpu: bool
    precision: str  # bf16 | fp16 | fp32
    weight_dtype: str  # the dtype the base loads in (models.base_dtype)
    quant_bits: int | None
    peak_tokens: int  # tokens in the largest batch (sequences_per_row included)
    peak_sequences: int  # the sequences that batch holds
    scored_tokens: float  # of those, the tokens with a loss (all of them when the loss is not lean)
    lean_loss: bool
    adapter: Any  # the AdapterConfig
    weight_bytes: Callable[[dict], float]  # bytes of a model's weights as this run loads them
    architecture: Callable[[str], dict]  # a model source -> its architecture (reads config.json only)


# The tile TRL's chunked log-prob head works on, positions x vocabulary entries (trl.kernels.chunked_logprob's
# TOKEN_CHUNK_SIZE, trl.trainer.utils' _CHUNKED_LOGPROB_CHUNK_SIZE), for the memory estimate, which imports no TRL
TRL_HEAD_TILE = (4096, 32768)


@dataclass(frozen=True)
class Generation:
    """What a method samples in each optimizer step before it trains on it (the step-time estimate's decoding part)."""

    sequences: float  # sequences sampled per optimizer step (a fraction of a batch when one serves several steps)
    batch: int  # sequences one generate call decodes together
    new_tokens: int  # tokens sampled per sequence: the completion length limit (a completion may stop sooner)
    kv_bytes: int  # bytes per key/value element of the sampler's cache (the dtype it decodes in)
    weight_bytes: float | None = None  # weight bytes each decoding step reads; None: the trained model's as loaded
    # forward-only passes over each sampled sequence before training, besides `reference_forward`'s (the sampling
    # policy's log-probs, a KL reference); they run at the training forward's throughput
    scoring_forwards: int = 0


class Method:
    """Defaults of every declaration and hook; a method overrides what differs."""

    Config: ClassVar[type[BaseModel]]  # the method's options: `method: {name: ..., <options>}`
    data: ClassVar[str] = "conversation"  # one of DATA_KINDS
    task: ClassVar[str] = "CAUSAL_LM"  # PEFT task type of the trained model ("SEQ_CLS": a one-score head)
    adapters: ClassVar[tuple[str, ...]] = ADAPTER_TYPES  # adapter types it trains with; others are refused up front
    float32_base: ClassVar[bool] = False  # keep a float32 base on CPU even with a LoRA adapter (see models.base_dtype)
    merge_final: ClassVar[bool] = False  # final/ holds the adapter merged in: a model plain transformers loads
    sequences_per_row: ClassVar[int] = 1  # sequences one training row puts through the forward (pairs: 2)
    reference_forward: ClassVar[bool] = False  # a frozen reference model scores each batch too (estimate FLOPs)
    # how its loss reaches the vocabulary when it is not the lean loss (CPU step time: estimate_time.CPU_HEAD_FLOPS):
    # "chunked" (TRL's fused log-prob head: DPO, KTO, GRPO, SFT's `loss: fused`), "logits" (full logits and a
    # log-softmax over them), "score" (a one-score head, no vocabulary)
    loss_head: ClassVar[str] = "chunked"
    # its trainer can move the activations kept for backward to CPU memory (TRL's SFTConfig.activation_offloading)
    activation_offloading: ClassVar[bool] = False
    # how far its resident memory on CPU grows over a whole run past the first steps' (the estimate's run_peak_mb,
    # on glibc's allocator); None: estimate.CPU_RUN_GROWTH
    cpu_run_growth: ClassVar[float | None] = None
    # the distributed.strategy values it trains under on several processes (a Trainer that accelerate wraps); any
    # other is refused under --nproc / torchrun before anything loads
    strategies: ClassVar[tuple[str, ...]] = ("ddp", "fsdp", "deepspeed")

    # -- checks, before the model loads or the run directory is written ----------------------------------------------
    def options(self, raw: dict) -> BaseModel:
        """The method's typed options from `method:` (less `name`)."""
        return self.Config(**raw)

    def check_adapter(self, name: str, adapter_type: str) -> None:
        if adapter_type not in self.adapters:
            raise UserError(f"method '{name}' does not train with adapter.type '{adapter_type}'; it takes "
                            f"{', '.join(self.adapters)}")

    def check(self, cfg, opts, data) -> None:
        """Refusals that need the config and the prepared data (UserError, one line)."""

    def resume_interval(self, opts) -> int:
        """Optimizer steps between the points a checkpoint resumes exactly from: checkpoints (save_steps, a graceful
        stop) fall on its multiples. 1 but where a step trains on data an earlier step made and checkpoints do not
        keep (GRPO reusing a generated batch)."""
        return 1

    def eval_metrics(self, opts) -> tuple[str, ...]:
        """What its evaluation during training reports, which `eval.metric` and a sweep's objective may name (checked
        before anything loads): metric names, and prefixes ending in "/" for families (eval_rewards/ covers
        eval_rewards/chosen). The first is what a run of the method is judged by (a sweep's `objective: auto`)."""
        return ("eval_loss",)

    # -- models ------------------------------------------------------------------------------------------------------
    def merges_final(self, opts) -> bool:
        """Whether final/ is the adapter merged into its base (merge_final; a method may decide per options)."""
        return self.merge_final

    def prepare_model(self, cfg, opts, model):
        """Reshape the loaded model before the adapter attaches (distill: a smaller student)."""
        return model

    def extra_models(self, cfg, opts, precision: str) -> dict:
        """Models besides the trained one, passed to build() by keyword (distill: the teacher)."""
        return {}

    # -- memory and time (tunelab estimate, and the estimate printed before training) -------------------------------
    def lean_loss(self, opts) -> bool:
        """Whether the loss projects only trained positions through the LM head (methods/lean.py)."""
        return False

    def loss_choices(self, opts) -> tuple[bool, ...]:
        """The lean_loss values the memory plan may pick from, fastest first (SFT with `loss: auto`: lean, then
        TRL's chunked head, which holds no trained-tokens x vocabulary logits). Default: the method's one choice."""
        return (self.lean_loss(opts),)

    def with_lean_loss(self, opts, lean: bool):
        """`opts` with the memory plan's choice of loss (only called with a value from loss_choices)."""
        return opts

    def uses_liger(self, opts, cuda: bool | None = None) -> bool:
        """Liger's fused kernels (GPU): fewer activations, a chunked loss. `cuda`: whether the run has a CUDA device
        (default: this machine's)."""
        return False

    def student_config(self, opts, model_config):
        """The config of the model that trains, from the loaded model's config (distill: fewer layers)."""
        return model_config

    def loss_memory(self, opts, ctx: EstimateContext) -> float | None:
        """Bytes the loss holds at its peak; None = a causal LM loss (lean, Liger's or TRL's chunked head)."""
        return None

    def extra_memory(self, cfg, opts, ctx: EstimateContext) -> dict[str, float]:
        """Memory the method adds besides the model, its training state and the loss, by part (bytes)."""
        return {}

    def generation(self, cfg, opts, ctx: EstimateContext) -> Generation | None:
        """What the method samples per optimizer step before training (GRPO, PPO); None: it samples nothing. The
        sequences it trains on are then the prompts (the data's token statistics) with `new_tokens` appended."""
        return None

    def training_passes(self, opts) -> int:
        """Forward and backward passes over each step's batch (PPO: its ppo_epochs over one rollout)."""
        return 1

    def micro_batches(self, opts) -> int:
        """Forward+backward passes each training pass splits a batch into (PPO: num_mini_batches)."""
        return 1

    def forward_only_passes(self, opts) -> int:
        """Forward passes (no backward) of the trained model over each batch's tokens besides training's: its frozen
        reference (`reference_forward`: the same model with the adapter off, or a copy) counts one."""
        return 1 if self.reference_forward else 0

    def frozen_forwards(self, cfg, opts, ctx: EstimateContext) -> list[dict]:
        """Architectures (estimate.architecture) of other models that run a forward, no backward, over every token
        of each training batch (distill: the teacher). A reference model that is the trained one with its adapter
        switched off is `reference_forward`."""
        return []

    # -- the trainer ---------------------------------------------------------------------------------------------
    def build(self, cfg, opts, model, tokenizer, data, args: dict, **extra):
        """A transformers Trainer (or an object with .train() and .state) for the prepared data. `args` holds the
        TrainingArguments shared by every method (train.training_arguments); `extra` the extra_models."""
        raise NotImplementedError
