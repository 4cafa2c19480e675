"""Group Relative Policy Optimization (GRPO): sample a group of completions per prompt, score them with reward
functions, and push the policy towards the completions that beat their group's mean (no value model).
Shao et al. 2024, "DeepSeekMath" (https://arxiv.org/abs/2402.03300); implemented by TRL's GRPOTrainer.

Rewards come from `tunelab.rewards` (built-ins, a reward model, or the user's own `module:function`), each with a
weight. Works with full fine-tuning, LoRA and QLoRA (`quantization.bits: 4`). With LoRA/QLoRA and `beta > 0`, the
KL reference is the base model (TRL keeps a frozen copy of the freshly initialized adapter, no second model).

Generation is GRPO's bottleneck. `generation: tunelab` (default) samples through TRL's `rollout_func` hook with
`model.generate` (one batch, KV cache, TRL's own sampling settings), with a LoRA adapter merged into float32 base
weights for the duration: on CPU, where a decoding step costs mostly per-layer overhead, the adapter's extra matmuls
are a large share of it (benchmarks/grpo_generation.py measures both paths). `generation: trl` uses TRL's path as is.
On a GPU machine with vLLM installed (`pip install vllm`), set `use_vllm: true`: TRL then runs vLLM inside the
training process (`vllm_mode: colocate`, sharing the GPU, memory share `vllm_gpu_memory_utilization`) or talks to a
separate `trl vllm-serve --model <base>` (`vllm_mode: server`).

Batch sizes count completions, not prompts: `training.batch_size x training.grad_accum` completions per optimizer
step must be a multiple of `num_generations` (e.g. batch_size 8, num_generations 4 = 2 prompts per step).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError
from tunelab.methods.contract import EstimateContext, Generation, Method
from tunelab.rewards import check_specs
from tunelab.rollout import left_pad, prompt_texts


class Config(BaseModel):
    """Options of `method: {name: grpo, ...}`."""

    model_config = ConfigDict(extra="forbid")
    rewards: list[str | dict] = Field(
        default_factory=lambda: ["gsm8k_correct", {"name": "format", "weight": 0.2}],
        description="reward specs: a name (gsm8k_correct, format, length, reward_model, module:function, "
        "path/file.py:function) or a mapping {name, weight, options...}")
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (TRL default 8)")
    max_completion_length: int = Field(256, gt=0, description="max tokens per completion (TRL default 512)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference model; 0 = no reference model "
                        "(TRL default); DeepSeek-R1 used 0.001")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="loss aggregation (TRL's loss variants, see GRPOConfig.loss_type)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the reward std of the group / batch, or not (Dr. GRPO)")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio")
    epsilon_high: float | None = Field(None, gt=0, description="upper clipping range (DAPO: 0.28); None = epsilon")
    num_iterations: int = Field(1, ge=1, description="policy updates per generated batch (mu)")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="sequence = GSPO-style sequence-level ratios")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max length out of the loss")
    generation: Literal["tunelab", "trl"] = Field(
        "tunelab", description="who samples completions without vLLM: tunelab (adapter merged while generating) or "
        "TRL's own generate path")
    use_vllm: bool = Field(False, description="generate with vLLM (GPU, vllm installed)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="vLLM in-process or a trl vllm-serve")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share of colocated vLLM")
    log_completions: bool = Field(False, description="print a sample of completions with their rewards")


class GRPO(Method):
    Config = Config
    data = "prompt"
    # with LoRA the adapter is folded into the base to generate and unfolded after: exact only over float32 weights
    float32_base = True

    def extra_memory(self, cfg, opts: Config, ctx: EstimateContext) -> dict[str, float]:
        """The KV cache of a generation batch, and on a bf16 CPU with LoRA the bf16 copy of the merged policy that
        rollouts sample from (bf16_sampler)."""
        arch = ctx.arch
        gens = cfg.training.batch_size * cfg.training.grad_accum  # one generation batch (generation() below)
        seq = cfg.data.max_length + opts.max_completion_length
        memory = {"kv_cache": gens * seq * arch["layers"] * 2 * arch["kv_heads"] * arch["head_dim"]
                  * _kv_bytes(cfg, opts, ctx)}
        if _bf16_sampler(cfg, opts, ctx):
            memory["sampler"] = arch["params"] * 2
        return memory

    def generation(self, cfg, opts: Config, ctx: EstimateContext) -> Generation:
        """TRL samples one generation batch, every completion of an optimizer step (batch_size x grad_accum), in one
        call, and reuses it for num_iterations steps; before training it scores the batch with the sampling policy
        when it is reused (num_iterations > 1) and with the reference when beta > 0."""
        batch = cfg.training.batch_size * cfg.training.grad_accum
        return Generation(sequences=batch / opts.num_iterations, batch=batch, new_tokens=opts.max_completion_length,
                          kv_bytes=_kv_bytes(cfg, opts, ctx),
                          weight_bytes=ctx.arch["params"] * 2 if _bf16_sampler(cfg, opts, ctx) else None,
                          scoring_forwards=int(opts.num_iterations > 1) + int(opts.beta > 0))

    def resume_interval(self, opts: Config) -> int:
        """TRL trains num_iterations steps on each generated batch and keeps no copy of it in checkpoints: a resume
        inside that window would sample a new batch where the uninterrupted run reused the old one."""
        return opts.num_iterations

    def eval_metrics(self, opts: Config) -> tuple[str, ...]:
        # TRL's GRPOTrainer samples completions of the validation prompts and reports what it logs in training
        return ("eval_reward", "eval_reward_std", "eval_loss", "eval_frac_reward_zero_std", "eval_entropy",
                "eval_num_tokens", *(("eval_kl",) if opts.beta > 0 else ()), "eval_rewards/", "eval_completions/",
                "eval_clip_ratio/")

    def check(self, cfg, opts: Config, data) -> None:
        """Mistakes found before the model loads or the run directory is written."""
        if not data.train:
            raise UserError("grpo: no training prompts")
        per_step = cfg.training.batch_size * cfg.training.grad_accum
        if per_step % opts.num_generations:
            raise UserError(f"grpo: training.batch_size x training.grad_accum ({per_step}) completions per step "
                            f"must be a multiple of method.num_generations ({opts.num_generations}); e.g. set "
                            f"training.batch_size={opts.num_generations * max(1, per_step // opts.num_generations)}")
        n = opts.num_iterations  # an epoch's steps are a multiple of it already (TRL's RepeatSampler)
        if n > 1 and cfg.training.save_strategy == "steps" and cfg.training.save_steps % n:
            raise UserError(f"grpo: method.num_iterations={n} trains {n} steps on each generated batch, which "
                            f"checkpoints do not keep, so a checkpoint resumes exactly only after such a group; set "
                            f"training.save_steps to a multiple of {n} (e.g. {n * -(-cfg.training.save_steps // n)})")
        if opts.use_vllm:
            import importlib.util

            import torch

            if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
                raise UserError("grpo: method.use_vllm needs a CUDA GPU and vLLM installed (pip install vllm); "
                                "set method.use_vllm=false to generate with transformers")
        check_specs(opts.rewards, [*data.train, *(data.validation or [])])

    def build(self, cfg, opts: Config, model, tokenizer, data, args: dict):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from tunelab.rewards import build_rewards

        funcs, weights = build_rewards(opts.rewards)
        grpo_args = GRPOConfig(
            # GRPO samples groups of prompts itself and counts prompt + completion tokens itself
            **{**args, "train_sampling_strategy": "random", "include_num_input_tokens_seen": "no"},
            num_generations=opts.num_generations,
            max_completion_length=opts.max_completion_length,
            temperature=opts.temperature,
            top_p=opts.top_p,
            beta=opts.beta,
            loss_type=opts.loss_type,
            scale_rewards=opts.scale_rewards,
            epsilon=opts.epsilon,
            epsilon_high=opts.epsilon_high,
            num_iterations=opts.num_iterations,
            importance_sampling_level=opts.importance_sampling_level,
            mask_truncated_completions=opts.mask_truncated_completions,
            reward_weights=weights,
            use_vllm=opts.use_vllm,
            vllm_mode=opts.vllm_mode,
            vllm_gpu_memory_utilization=opts.vllm_gpu_memory_utilization,
            log_completions=opts.log_completions,
            num_generations_eval=opts.num_generations,
        )
        trainer = GRPOTrainer(
            model=model,
            rollout_func=None if opts.use_vllm or opts.generation == "trl" else rollout,
            reward_funcs=funcs,
            args=grpo_args,
            train_dataset=Dataset.from_list(data.train),
            eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
            processing_class=tokenizer,
        )
        if trainer.rollout_func is not None:
            trainer._tunelab_clock = rollout_clock()
            trainer.add_callback(trainer._tunelab_clock)  # before train.py's metrics log, which then writes its field
        return trainer


def rollout_clock():
    """A callback adding `rollout_seconds` to each training log: the seconds tunelab's rollout (adapter folded in,
    sampler refreshed, generate) took per optimizer step since the previous log, so that a step's time splits into
    sampling and training (the step-time estimate's generation part is checked against it)."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):
        seconds, last_step = 0.0, 0

        def on_train_begin(self, args, state, control, **kw):
            self.last_step = state.global_step  # a resumed run counts from its checkpoint's step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None and "loss" in logs and state.global_step > self.last_step:
                logs["rollout_seconds"] = round(self.seconds / (state.global_step - self.last_step), 3)
                self.seconds, self.last_step = 0.0, state.global_step

    return _Clock()


def _bf16_sampler(cfg, opts: Config, ctx: EstimateContext) -> bool:
    """Whether rollouts sample from a bf16 copy of the merged policy (bf16_sampler): tunelab's rollout on a bf16 CPU
    with LoRA over a float32, unquantized base."""
    return bool(opts.generation == "tunelab" and not opts.use_vllm and not ctx.gpu and ctx.precision == "bf16"
                and ctx.weight_dtype == "float32" and not ctx.quant_bits and ADAPTERS[cfg.adapter.type].lora_layers)


def _kv_bytes(cfg, opts: Config, ctx: EstimateContext) -> int:
    """Bytes per element of the generation KV cache: bf16 on a GPU and in the bf16 sampler, float32 otherwise."""
    return 2 if ctx.gpu or _bf16_sampler(cfg, opts, ctx) else 4


@contextmanager
def merged_adapter(model):
    """A LoRA adapter folded into the base weights while generating, when that is exact enough to undo: float32,
    unquantized base weights (unmerging bf16 weights would round them a little more every step). Yields whether it
    merged."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    base = getattr(model, "base_model", None)
    # ZeRO-3 keeps each process's shard of the weights only (gathered layer by layer inside its forward)
    mergeable = (hasattr(model, "merge_adapter") and not getattr(model.config, "quantization_config", None)
                 and not is_deepspeed_zero3_enabled()
                 and all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" not in n)
                 and all(getattr(c, "peft_type", None) == "LORA" for c in getattr(model, "peft_config", {}).values())
                 and base is not None)
    if not mergeable:
        yield False
        return
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield True
    finally:
        with torch.no_grad():
            model.unmerge_adapter()


def bf16_sampler(trainer, model):
    """On CPU with bf16 precision: a plain bf16 copy of the merged policy to sample from, kept on the trainer and
    refreshed in place each rollout. Decoding reads every weight per token and AMX CPUs run bf16 matmuls natively:
    SmolLM2-135M sampled ~130 tokens/s this way against ~88 from the float32 PEFT model; bf16 autocast over the PEFT
    model (62) and a bf16 deepcopy of it (74) were slower, hence a separate plain model. The log-probs GRPO trains on
    are recomputed by TRL's own forward, so sampling precision only shapes which completions are drawn, as with vLLM
    sampling in bf16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if model.device.type != "cpu" or not trainer.args.bf16:
        return model
    base = model.get_base_model()
    weights = {name.replace(".base_layer.", "."): p for name, p in base.named_parameters() if "lora_" not in name}
    sampler = getattr(trainer, "_tunelab_sampler", None)
    if sampler is None:
        # left with requires_grad set (it only ever runs under no_grad): frozen weights sampled at 1.33x TRL's
        # rate instead of 1.74x on the CPU this was measured on (benchmarks/grpo_generation.py)
        # from_config draws random initial weights (overwritten below) from the global generator that sampling
        # draws from too: a run resumed from a checkpoint builds the copy at its first rollout after the Trainer
        # restored that generator, an uninterrupted run at its very first, so those draws would shift the resumed
        # run's samples off the uninterrupted run's
        with torch.random.fork_rng(devices=[]):
            sampler = AutoModelForCausalLM.from_config(base.config, dtype=torch.bfloat16).eval()
        sampler.generation_config = base.generation_config
        trainer._tunelab_sampler = sampler
    if set(weights) - set(sampler.state_dict()):  # e.g. modules_to_save copies: sample from the policy itself
        return model
    result = sampler.load_state_dict(weights, strict=False)  # copies and casts into the bf16 tensors in place
    return model if set(result.missing_keys) - {"lm_head.weight"} else sampler  # only a tied head may be missing


def rollout(prompts: list, trainer) -> dict:
    """TRL's rollout_func: completions for a generation batch (prompts already repeated num_generations times)."""
    import torch

    start = time.perf_counter()
    tok = trainer.processing_class
    texts = prompt_texts(tok, prompts, **trainer.chat_template_kwargs)
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    ids, mask = left_pad(prompt_ids, tok.pad_token_id, model.device)
    width = ids.shape[1]
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with merged_adapter(model) as merged, torch.no_grad():
            sampler = bf16_sampler(trainer, model) if merged else model
            out = sampler.generate(input_ids=ids, attention_mask=mask, generation_config=trainer.generation_config)
    finally:
        model.train(was_training)
    stops = set(trainer.eos_token_ids)
    completion_ids = []
    for row in out[:, width:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        completion_ids.append(row[:end])
    clock = getattr(trainer, "_tunelab_clock", None)
    if clock is not None and was_training:  # evaluation's rollouts are not a training step's
        clock.seconds += time.perf_counter() - start
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


METHOD = GRPO()
