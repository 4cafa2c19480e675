"""The adapter table: every `adapter.type` and what it implies, declared once.

Each entry says how to build its PEFT config, whether it adds virtual tokens instead of changing weights (prompt
learning), whether the frozen base may load in half precision on CPU, whether the untrained adapter is the identity
(so the base with the adapter switched off is the reference model of DPO/KTO/PPO), whether it merges into the base,
how many parameters it trains (for the estimate) and what it adds to the activations. config.py, models.py,
estimate.py, train.py, the methods and export read these fields; none of them tests adapter names.

Adding an adapter = one `Adapter(...)` entry below (and its options in config.AdapterConfig when it needs new ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Adapter:
    name: str
    # AdapterConfig, PEFT task type, tokenizer path -> a PEFT config (None: full fine-tuning, no adapter)
    peft_config: Callable
    # trainable parameters for the estimate: (AdapterConfig, architecture dict from estimate.architecture) -> int
    params: Callable
    trains_base: bool = False  # full fine-tuning: every base weight trains
    prompt_learning: bool = False  # prepends virtual tokens (PEFT prompt learning); the model's weights stay as is
    half_base_on_cpu: bool = False  # the frozen base may load in bf16 on a CPU run (LoRA-style adapters only)
    identity_at_start: bool = False  # a fresh adapter changes nothing: disabled, it gives the reference model
    mergeable: bool = False  # PEFT's merge_and_unload folds it into the base weights
    lora_layers: bool = False  # PEFT LoRA layers (LoRA, DoRA): GRPO's rollout folds them into the base to sample
    # extra bytes per activation element the backward keeps: (AdapterConfig, float32 activations?) -> bytes
    activation_bytes: Callable = lambda a, f32: 0.0
    # a CPU training step's time over what its FLOPs say (the step-time estimate); 1 = a LoRA step's
    cpu_step_factor: float = 1.0
    # tokens it puts in front of every sequence, through every layer (prompt tuning, P-tuning): AdapterConfig -> int
    virtual_inputs: Callable = lambda a: 0
    # transformers' gradient checkpointing runs with it (training.gradient_checkpointing may be on)
    checkpointing: bool = True


def _none(a, task_type, tokenizer_path):
    return None


def _lora(a, task_type, tokenizer_path):
    import peft

    return peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, bias=a.bias,
                           target_modules=a.target_modules, use_dora=a.type == "dora", use_rslora=a.use_rslora,
                           modules_to_save=a.modules_to_save, task_type=task_type)


def _ia3(a, task_type, tokenizer_path):
    import peft

    targets = a.target_modules
    if targets == "all-linear":  # IA3 needs explicit feed-forward modules; PEFT's per-arch defaults know them
        targets = None
    return peft.IA3Config(target_modules=targets, task_type=task_type)


def _prefix(a, task_type, tokenizer_path):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, prefix_projection=a.prefix_projection,
                                   task_type=task_type)


def _prompt(a, task_type, tokenizer_path):
    import peft

    init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": a.prompt_init_text,
            "tokenizer_name_or_path": tokenizer_path} if a.prompt_init_text else {"prompt_tuning_init": "RANDOM"}
    return peft.PromptTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type=task_type, **init)


def _ptuning(a, task_type, tokenizer_path):
    import peft

    return peft.PromptEncoderConfig(num_virtual_tokens=a.num_virtual_tokens,
                                    encoder_hidden_size=a.encoder_hidden_size, task_type=task_type)


def _lora_params(a, arch) -> int:
    """r x (in + out) per targeted linear layer; DoRA adds a magnitude per output feature."""
    targets = a.target_modules
    chosen = [(i, o) for name, i, o in arch["linears"]
              if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets]
    return sum(a.r * (i + o) + (o if a.type == "dora" else 0) for i, o in chosen)


def _lora_activations(a, f32: bool) -> float:
    # LoRA dropout keeps its output for backward: float32 (measured); bf16: a boolean mask and the bf16 output
    return (4.0 if f32 else 3.0) if a.dropout > 0 else 0.0


def _dora_activations(a, f32: bool) -> float:
    # DoRA also keeps each linear's base and LoRA outputs for the magnitude's gradient: configs/qa/dora.yaml
    # measured 1,770 MB over configs/qa/lora.yaml (2,888 tokens), ~2 more bytes per element with the CPU factor
    return _lora_activations(a, f32) + 2.0


def _virtual_token_params(a, arch) -> int:
    # prefix tuning learns keys and values for every layer; prompt tuning / P-tuning one embedding per virtual token
    per_token = arch["hidden"] * (2 * arch["layers"] if a.type == "prefix" else 1)
    return a.num_virtual_tokens * per_token


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("none", _none, params=lambda a, arch: arch["params"], trains_base=True),
    Adapter("lora", _lora, params=_lora_params, half_base_on_cpu=True, identity_at_start=True, mergeable=True,
            lora_layers=True, activation_bytes=_lora_activations),
    # DoRA's step: configs/qa/dora.yaml ran 1.6-2.3x (idle machine) and 3.1x (a slower day) the time of
    # configs/qa/lora.yaml (same base, rank and data) per FLOP (benchmarks/RESULTS.md): PEFT recomputes the norm of
    # every adapted weight (W + BA, a full-size tensor per layer) in each forward
    Adapter("dora", _lora, params=_lora_params, half_base_on_cpu=True, identity_at_start=True, mergeable=True,
            lora_layers=True, activation_bytes=_dora_activations, cpu_step_factor=2.0),
    Adapter("ia3", _ia3, params=lambda a, arch: sum(o for _, _, o in arch["linears"]),  # a scale per output feature
            identity_at_start=True, mergeable=True),
    # Prompt learning's CPU step: no adapter layers to run, so its body (TRL's loss head apart, counted by the
    # estimate) took ~0.8x a LoRA step's time per FLOP (configs/qa/prompt.yaml against configs/qa/lora.yaml, py-spy)
    # prefix tuning under gradient checkpointing fails at the first step: the recomputed layer sees its attention mask
    # without the prefix's past keys ("size of tensor a (40) must match b (60)"), transformers 5 / PEFT 0.18
    Adapter("prefix", _prefix, params=_virtual_token_params, prompt_learning=True, cpu_step_factor=0.8,
            checkpointing=False),
    # prefix tuning adds keys and values only; prompt tuning and P-tuning prepend embeddings the whole model runs on
    Adapter("prompt", _prompt, params=_virtual_token_params, prompt_learning=True, cpu_step_factor=0.8,
            virtual_inputs=lambda a: a.num_virtual_tokens),
    Adapter("ptuning", _ptuning, params=_virtual_token_params, prompt_learning=True, cpu_step_factor=0.8,
            virtual_inputs=lambda a: a.num_virtual_tokens),
)}

ADAPTER_TYPES = tuple(ADAPTERS)


def adapter(name: str) -> Adapter:
    return ADAPTERS[name]
