"""Typed run configuration.

One pydantic model per concern (model, data, method, adapter, quantization, training, output, eval). Every model
forbids unknown keys, so a typo is an error naming the nearest valid key instead of a silently ignored setting.
This is the lowest layer: it imports nothing of tunelab's but errors and the adapter table. A method's own options
live in the method's file (`methods/<name>.py: Config`) and data format names in the data layer;
`tunelab.api.load_config` checks those against the sections read here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.adapters import ADAPTER_TYPES
from tunelab.errors import UserError, suggest

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


class Section(BaseModel):
    # no setting means infinity or NaN (training.epochs=inf passed gt=0, then failed inside the Trainer)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    source: str = Field(EMBEDDED_DEFAULT, description="hub id, local directory, or embedded:NAME")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight dtype; auto follows training.precision")
    trust_remote_code: bool = Field(False, description="run model code from the hub; off unless you trust it")
    attn_implementation: str | None = Field(None, description="eager | sdpa | flash_attention_2; None = library default")
    chat_template: str | None = Field(
        None, description="a built-in template name (chatml, llama3, mistral, gemma, phi, alpaca, completion), Jinja "
        "text, or a file; default: the model's own, else alpaca (data/templates.py)")


class SourceConfig(Section):
    path: str = Field(..., description="local file/dir/glob, bundled:NAME, or hub dataset id")
    weight: float = Field(1.0, gt=0, description="mixing weight: 2 = every row twice, 0.5 = a random half")
    split: str | None = Field(None, description="hub split (default train)")
    name: str | None = Field(None, description="hub dataset config name")
    revision: str | None = Field(None, description="hub revision (pin it so the preprocessing cache cannot drift)")
    format: str | None = Field(None, description="this source's format when it differs from data.format")
    columns: dict[str, str] | None = Field(None, description="this source's rename map (your field -> expected)")


Sources = str | SourceConfig | list[str | SourceConfig]


class _SourceError(ValueError):
    """A mistake inside one source of data.train/validation: `where` ('[0].weight') extends the config key, `value`
    is the value at fault (pydantic would name the whole list)."""

    def __init__(self, msg: str, where: str, value=None):
        super().__init__(msg)
        self.where, self.value = where, value


class DataConfig(Section):
    train: Sources = Field(
        "bundled:gsm8k/train", description="training data: a path, dir, glob, bundled:NAME, hub id, or a list of "
        "sources (with weights) mixed together")
    validation: Sources | None = Field(None, description="separate validation data (then val_split is not used)")
    format: str = Field("auto", description="auto (detect from field names and values), or one of: messages, "
                        "sharegpt, alpaca, dolly, prompt_completion, text, qa, dialogue_summary, preference, hh_rlhf, "
                        "kto (see tunelab data inspect)")
    columns: dict[str, str] = Field(default_factory=dict, description="rename map: your field -> expected field")
    val_split: float = Field(0.0, ge=0, lt=1, description="fraction of the distinct training rows held out for "
                       "validation (a held-out row leaves training with all its weighted repeats)")
    subset: int | None = Field(None, gt=0, description="use only N randomly chosen training rows")
    shuffle: bool = Field(True, description="shuffle the (mixed) training rows before subset/split")
    seed: int = Field(42, description="seed for mixing, subset, split and shuffling")
    max_length: int = Field(1024, gt=8, description="max tokens per sample")
    overlong: Literal["truncate", "drop", "error"] = Field("truncate", description="what to do with longer samples")
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="a malformed or invalid row: stop with its file:line, or skip it (counted and reported)")
    system_prompt: str | None = Field(None, description="system prompt added to conversations that have none")
    allow_truncated_eos: bool = Field(
        False, description="train even when data.max_length cuts the end-of-turn token off most samples (a model "
        "that then rarely learns to stop); default: refuse, naming a max_length that keeps it")
    dedupe: bool = Field(False, description="drop exact duplicate rows")
    packing: bool = Field(False, description="pack samples into max_length rows (SFT)")
    padding_free: bool = Field(False, description="concatenate a batch without padding, positions kept apart (SFT)")
    cache: bool = Field(True, description="cache tokenized data on disk, keyed by data, tokenizer, template, settings")
    cache_dir: str | None = Field(None, description="where the data cache lives (default: $TUNELAB_CACHE/data)")

    @field_validator("columns", mode="before")
    @classmethod
    def _no_columns(cls, v):
        return {} if v is None else v  # data.columns=null clears a rename map

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _sources(cls, v):
        # Build source mappings here so a mistake in one reads as one line about that source, not as pydantic's
        # report on every member of the str | SourceConfig | list union.
        if not isinstance(v, (list, dict)):
            return v
        out = []
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            if not isinstance(item, dict):
                out.append(item)
                continue
            at = f"[{i}]" if isinstance(v, list) else ""
            unknown = [k for k in item if k not in SourceConfig.model_fields]
            if unknown:
                raise _SourceError(f"unknown source key '{unknown[0]}'{suggest(unknown[0], SourceConfig.model_fields)} "
                                   f"(valid: {', '.join(SourceConfig.model_fields)})", at)
            try:
                out.append(SourceConfig(**item))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in err["loc"]) or "path"
                raise _SourceError(err["msg"], f"{at}.{where}", err.get("input")) from None
        return out if isinstance(v, list) else out[0]


class MethodConfig(BaseModel):
    """`name` picks the method; every other key is checked against that method's own Config (tunelab.methods)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("sft", description="sft | dpo | orpo | kto | simpo | reward | ppo | grpo | distill")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AdapterConfig(Section):
    type: str = Field("lora", description=f"{' | '.join(ADAPTER_TYPES)} (none = full fine-tuning; see adapters.py)")
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 = off, the fastest; 0.05-0.1 to regularize "
                           "small datasets)")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear', or module names as a list or a comma string ('q_proj,v_proj', as "
        "training scripts pass --target_modules); names matching no linear layer of the model are refused")
    modules_to_save: list[str] | None = Field(None, description="extra modules trained fully and saved")
    use_rslora: bool = Field(False, description="rank-stabilized LoRA scaling alpha/sqrt(r)")
    num_virtual_tokens: int = Field(20, gt=0, description="prefix / prompt / P-tuning: virtual tokens")
    prompt_init_text: str | None = Field(None, description="prompt tuning: initialize from this text")
    encoder_hidden_size: int = Field(128, gt=0, description="P-tuning prompt encoder width")
    prefix_projection: bool = Field(False, description="prefix tuning: reparameterize through an MLP")

    @field_validator("target_modules")
    @classmethod
    def _module_list(cls, v):
        # PEFT reads a plain string as one regular expression, so "q_proj,v_proj" would match nothing and fail only
        # when the adapter attaches; names are what users mean, so a string becomes the list of its comma parts
        if isinstance(v, str) and v != "all-linear":
            v = v.split(",")
        if isinstance(v, list):
            v = [x.strip() for x in v if x.strip()]
            if not v:
                raise ValueError("give module names, e.g. q_proj,v_proj, or all-linear")
        return v

    @field_validator("type")
    @classmethod
    def _known_adapter(cls, v: str) -> str:
        if v not in ADAPTER_TYPES:
            raise ValueError(f"unknown adapter type '{v}'{suggest(v, ADAPTER_TYPES)}; known: {', '.join(ADAPTER_TYPES)}")
        return v


class QuantizationConfig(Section):
    bits: Literal[None, 4, 8] = Field(None, description="load the base in 4-bit (QLoRA) or 8-bit; None = off")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="quantize the quantization constants too")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="4-bit matmul dtype")


# Arguments each learning-rate schedule takes through training.scheduler_kwargs (transformers.get_scheduler's
# scheduler_specific_kwargs), and those it cannot run without: (allowed, required, "one of" groups).
SCHEDULER_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]] = {
    "linear": ((), (), ()),
    "cosine": (("num_cycles",), (), ()),
    "constant": ((), (), ()),
    "constant_with_warmup": ((), (), ()),
    "cosine_with_restarts": (("num_cycles",), (), ()),
    "polynomial": (("lr_end", "power"), (), ()),
    "inverse_sqrt": (("timescale",), (), ()),
    "cosine_with_min_lr": (("min_lr", "min_lr_rate", "num_cycles"), (), (("min_lr", "min_lr_rate"),)),
    "warmup_stable_decay": (("num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio",
                             "num_cycles"), ("num_decay_steps",), ()),
}
SCHEDULER_EXAMPLE = {"cosine_with_min_lr": "training.scheduler_kwargs={min_lr_rate: 0.1}",
                     "warmup_stable_decay": "training.scheduler_kwargs={num_decay_steps: 100}"}


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps; -1 = use epochs")

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        # 0 trained one step and called the run complete (the Trainer reads 0 as "use epochs", then stops after a step)
        if v == 0 or v < -1:
            raise ValueError("must be a number of steps above 0, or -1 to train for training.epochs")
        return v

    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                       "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"] = Field(
        "linear", description="learning-rate schedule (TrainingArguments lr_scheduler_type)")
    scheduler_kwargs: dict[str, float | int | str] = Field(
        default_factory=dict, validate_default=True,
        description="the schedule's own arguments (TrainingArguments lr_scheduler_kwargs): cosine_with_min_lr needs "
        "min_lr or min_lr_rate (a fraction of learning_rate); warmup_stable_decay needs num_decay_steps (and takes "
        "num_stable_steps, decay_type, min_lr_ratio, ...); cosine: num_cycles; polynomial: lr_end, power; "
        "inverse_sqrt: timescale. Default: none")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps spent warming up")
    warmup_steps: int = Field(0, ge=0, description="warmup steps (overrides warmup_ratio when > 0)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0, description="per-device batch size")
    eval_batch_size: int | None = Field(None, gt=0, description="per-device batch size for evaluation; None = "
                                        "batch_size")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    optimizer: str = Field("adamw_torch", description="adamw_torch | adamw_8bit | paged_adamw_32bit | ... (TrainingArguments optim)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="Adam(W) beta1 (TrainingArguments default)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="Adam(W) beta2 (TrainingArguments default)")
    adam_epsilon: float = Field(1e-8, gt=0, description="Adam(W) epsilon (TrainingArguments default)")
    max_grad_norm: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing factor (0 = off; "
                                   "TrainingArguments label_smoothing_factor)")
    torch_compile: bool = Field(False, description="compile the model with torch.compile (slow first steps; GPU)")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations in backward (less memory, ~1/3 more compute); auto: on only "
        "when the estimate says the run would not fit the device's free memory otherwise (tunelab/autoplan.py)")
    activation_offloading: bool | Literal["auto"] = Field(
        "auto", description="move the activations kept for backward to CPU memory and back (TRL's "
        "activation_offloading; GPU only, methods on TRL's SFT trainer: sft, distill); auto: on only when the "
        "estimate says the run would not fit with gradient checkpointing alone")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="memory the `auto` settings plan for; default: 85% of the device's free memory")
    group_by_length: bool = Field(
        True, description="batch samples of similar length (less padding), the longest batch first (SFT rows, "
        "DPO/ORPO/SimPO/reward pairs; KTO keeps its own order, GRPO/PPO draw prompts at random); TRL default False")
    logging_steps: int = Field(1, gt=0)
    eval_strategy: Literal["steps", "epoch", "no"] = Field(
        "steps", description="steps: evaluate every eval_steps (none while eval_steps is unset); epoch: at the end "
        "of every epoch; no: never (all need validation data except no)")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (needs validation data)")
    save_strategy: Literal["steps", "epoch"] = Field(
        "steps", description="steps: checkpoint every save_steps; epoch: at the end of every epoch (checkpoints "
        "stay atomic and resumable either way)")
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps (save_strategy steps)")
    save_total_limit: int | None = Field(2, gt=0, description="keep the last K checkpoints")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the hardware has it (also on CPU), else fp32")
    report_to: list[str] = Field(default_factory=list, description="tensorboard | wandb | mlflow")

    @field_validator("scheduler_kwargs", mode="before")
    @classmethod
    def _scheduler_numbers(cls, v):
        # null clears the kwargs (training.scheduler_kwargs=null); '1e-5' from a quoted YAML value or a config built
        # in code is the number it reads as: get_scheduler would only fail on the string once training starts
        if v is None:
            return {}
        return {k: exp_float(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _no_is_a_word(cls, v):
        # YAML reads a bare `no` (eval_strategy: no, training.eval_strategy=no) as false
        return "no" if v is False else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, v):
        # one tracker, or a comma string as training scripts pass --report_to; `none` (transformers' word for no
        # tracker) is the empty list, and a tracker named twice is one
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if v is None:
            return []
        return list(dict.fromkeys(x for x in v if x != "none")) if isinstance(v, list) else v

    @field_validator("scheduler_kwargs")
    @classmethod
    def _scheduler_arguments(cls, v, info):
        name = info.data.get("scheduler")
        if name not in SCHEDULER_ARGS:  # the scheduler itself was refused; that error is the one reported
            return v
        allowed, required, one_of = SCHEDULER_ARGS[name]
        for k in v:
            if k not in allowed:
                takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
                raise ValueError(f"scheduler '{name}' has no argument '{k}'{suggest(k, allowed)}; {takes}")
        for group in one_of:
            given = [k for k in group if k in v]
            if len(given) > 1:  # transformers would take one and ignore the other without a word
                raise ValueError(f"scheduler '{name}' takes {' or '.join(group)}, not both; keep one")
        missing = [k for k in required if k not in v] + [" or ".join(g) for g in one_of if not any(k in v for k in g)]
        if missing:
            raise ValueError(f"scheduler '{name}' needs {missing[0]}, e.g. {SCHEDULER_EXAMPLE.get(name, '')}")
        return v


class OutputConfig(Section):
    dir: str = Field("runs", description="parent directory of runs")
    name: str | None = Field(None, description="run name; default: the config file's name")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue from the last complete checkpoint; never: refuse an existing run")
    resume_from: str | None = Field(
        None, description="start this run from a checkpoint directory (checkpoints/checkpoint-N of a run with the "
        "same model, method, adapter and quantization): weights, optimizer, scheduler, RNG and step continue from "
        "it. Used while the run has no checkpoint of its own; after that the run resumes from its own last one")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        # the run directory is output.dir/name, and --overwrite deletes it: a name that climbs out of output.dir
        # ('..', 'a/../..'), names output.dir itself ('.') or is absolute would point that delete at another folder
        return v if v is None else folder_name(v, "a run name", "output.dir")


def folder_name(v: str, what: str, parent: str) -> str:
    """`v` when it names one folder inside its parent (a ValueError otherwise): not empty, '.' or '..', no separator,
    not absolute. For names whose folder --overwrite deletes (runs, sweeps)."""
    if v in ("", ".", "..") or any(c in v for c in "/\\") or Path(v).is_absolute():
        raise ValueError(f"{what} is one folder name inside {parent}, without / or \\ and not . or ..; put the parent "
                         f"folder in {parent}")
    return v


class EvalConfig(Section):
    """Evaluation during training (needs data.validation or data.val_split, and training.eval_steps)."""

    task: Literal[None, "gsm8k"] = Field(None, description="also score a task at every evaluation (eval_gsm8k_accuracy)")
    task_data: str = Field("bundled:gsm8k/test", description="held-out questions for the task metric")
    task_samples: int = Field(20, gt=0, description="how many task questions per evaluation")
    task_max_new_tokens: int = Field(200, gt=0)
    metric: str = Field("eval_loss", description="metric for the best checkpoint and early stopping, e.g. eval_loss, "
                        "eval_gsm8k_accuracy")
    direction: Literal["auto", "min", "max"] = Field("auto", description="auto: minimize losses; maximize "
                                                     "accuracies, margins, sampled rewards; others need min or max")
    load_best: bool = Field(True, description="restore the best checkpoint by `metric` at the end")
    early_stopping_patience: int | None = Field(None, gt=0, description="stop after N evaluations without improvement")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smallest change that counts as improvement")
    overfitting_patience: int = Field(3, gt=0, description="warn when val loss rises N evals while train loss falls")


class DistributedConfig(Section):
    """How several processes share a run (`tunelab train --nproc N`, torchrun or accelerate launch); unused in one."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a full copy per process, gradients averaged; fsdp: weights, gradients and "
        "optimizer state sharded across processes (FSDP2); deepspeed: ZeRO (needs the deepspeed package)")
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard"] = Field(
        "full_shard", description="fsdp: what is sharded (full_shard: everything, like ZeRO-3)")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep sharded parameters in CPU memory")
    fsdp_activation_checkpointing: bool = Field(False, description="fsdp: recompute each wrapped layer in backward")
    zero_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage (2: optimizer state and gradients "
                                      "sharded; 3: the weights too)")
    zero_offload: bool = Field(False, description="deepspeed: optimizer state (and with stage 3 the weights) in CPU "
                               "memory")


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data):
        # a section left empty (`training:` with nothing under it, or training=null on the command line) means its
        # defaults, not a mistake
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}
        return data

    def eval_schedule(self) -> str:
        """When the run evaluates: 'steps' (every training.eval_steps), 'epoch' or 'no' (TrainingArguments
        eval_strategy). training.eval_strategy 'steps' without eval_steps, or no validation data, means none."""
        t = self.training
        has_val = bool(self.data.validation or self.data.val_split)
        if not has_val or t.eval_strategy == "no" or (t.eval_strategy == "steps" and not t.eval_steps):
            return "no"
        return t.eval_strategy

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["method"] = {"name": self.method.name, **self.method.options()}
        return yaml.safe_dump(data, sort_keys=False)


def _valid_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """All dotted keys under `path` of a pydantic model class (for suggestions)."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def config_keys(model: type[BaseModel] = RunConfig, path: tuple = ()) -> list[str]:
    """Every dotted key under `path` (e.g. 'training.learning_rate', 'method.name'), for checking and suggesting
    keys given as dotted strings (sweep files). Walks the sections through `_valid_keys`, so both listings agree."""
    out = []
    for name in _valid_keys(model, path):
        inner = config_keys(model, (*path, name))  # [] for a leaf: its annotation is not a section model
        out += inner or [".".join(map(str, (*path, name)))]
    return out


def explain_validation_error(err: ValidationError, prefix: str = "", model: type[BaseModel] = RunConfig) -> str:
    """One line for a pydantic error: the dotted key, and for an unknown key the nearest valid one."""
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if not isinstance(x, int))
    key = ".".join([prefix, *map(str, loc)] if prefix else map(str, loc))
    if e["type"] == "extra_forbidden":
        parent, leaf = loc[:-1], str(loc[-1])
        choices = _valid_keys(model, parent)
        hint = suggest(leaf, choices)
        if not hint and choices:
            hint = f" (valid keys here: {', '.join(choices)})"
        if key.startswith("method.") and len(loc) == 1:
            # often an option of the file's method left behind by method.name=OTHER on the command line
            hint += "; an option of another method? method={name: NAME} on the command line replaces the whole section"
        return f"unknown config key '{key}'{hint}"
    got = e.get("input")
    inner = (e.get("ctx") or {}).get("error")
    if isinstance(inner, _SourceError):  # one source of a list: its own key and value, not the whole list
        key, got = key + inner.where, inner.value
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
    # a value of a union type (`bool | Literal["auto"]`) fails each member: pydantic reports one error per member,
    # located at the member's name ('training.gradient_checkpointing.bool'); name the key and every accepted form
    if len(loc) > 1 and str(loc[-1]) not in _valid_keys(model, loc[:-1]):
        members = [x for x in err.errors() if tuple(y for y in x["loc"] if not isinstance(y, int))[:-1] == loc[:-1]]
        if len(members) > 1:
            key = key.rsplit(".", 1)[0]
            forms = dict.fromkeys(x["msg"].removeprefix("Input should be ").split(",")[0] for x in members)
            msg = f"Input should be {' or '.join(forms)}"
    return f"config key '{key}': {msg}{got_s}"


# PyYAML follows YAML 1.1, which reads 1e-5 (an exponent without a dot) as a string; YAML 1.2 and every user mean the
# number. Config files, overrides and sweep files are read through ConfigLoader, which reads it as a float.
EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def exp_float(value):
    """`value`, or the float an exponent string ('1e-5') means (values that did not come through ConfigLoader)."""
    return float(value) if isinstance(value, str) and EXP_FLOAT.fullmatch(value) else value


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 1e-5 as a number and refuses a key given twice in one mapping (PyYAML keeps the
    last one silently, so `training:` written twice would drop the first section's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXP_FLOAT, list("-+0123456789."))


def load_yaml(text: str):
    """YAML text through ConfigLoader (yaml.YAMLError on bad YAML)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506  (ConfigLoader is a SafeLoader)


def _text_field(parts: list[str]) -> bool:
    """Whether the dotted key is a plain string field (str or str | None) of the run config."""
    import types
    import typing

    model: Any = RunConfig
    for i, part in enumerate(parts):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
            continue
        if ann is str:
            return True
        is_union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        return is_union and set(typing.get_args(ann)) == {str, type(None)}
    return False


def override_value(key: str, text: str):
    """The value of a command-line `key=text`. Text is read as YAML (numbers, lists, mappings, true/false, null),
    except for a string key, which keeps the text as typed: `output.name=001` is the name '001', a Jinja template
    in model.chat_template is not YAML. Text that is not valid YAML (`data.train=*.jsonl`) is kept as typed too."""
    if text == "":
        return None
    if _text_field(key.split(".")):
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if quoted or text in ("null", "Null", "NULL", "~"):
            try:
                return load_yaml(text)
            except yaml.YAMLError:
                return text
        return text
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def set_key(raw: dict, key: str, value, item: str | None = None) -> None:
    """Set the dotted `key` in `raw` (in place) to `value`, whole: a mapping replaces the mapping there instead of
    merging into it, so `training.scheduler_kwargs={}` clears the file's kwargs and `method={name: sft}` drops the
    file's method options. A part of the key that holds a value rather than a section is one UserError line."""
    item = item or f"{key}=..."
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override '{item}': '{key}' is not a dotted config key (e.g. training.learning_rate=1e-4)")
    node = raw
    for i, part in enumerate(parts[:-1]):
        inner = node.get(part)
        if inner is None:
            inner = node[part] = {}
        elif not isinstance(inner, dict):
            where = ".".join(parts[: i + 1])
            raise UserError(f"override '{item}': '{where}' is set to {inner!r}, not a section, so it has no key "
                            f"'{parts[i + 1]}'; set '{where}' to a mapping or drop the value given to it")
        node = inner
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with ['training.learning_rate=1e-4', ...] applied in order (set_key, override_value)."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. training.learning_rate=1e-4)")
        key, text = item.split("=", 1)
        set_key(out, key, override_value(key.strip(), text), item)
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['training.learning_rate=1e-4', ...] -> nested dict (see apply_overrides)."""
    return apply_overrides({}, overrides)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, what: str = "config file",
              expected: str = "a config must be a mapping of sections (model:, data:, training:, ...)") -> dict:
    """A YAML mapping from a file, unvalidated (the sweep reads its own file and a base config this way). An empty
    file is refused: it would otherwise run every default (a full run on bundled data) without a word."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {path}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        raw = load_yaml(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; {expected}") from None
    if raw is None:
        raise UserError(f"{path} is empty; {expected}")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {expected}")
    return raw


def read_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted overrides, validate the sections. Errors are one-line `UserError`s.

    What the sections name in other layers (the method and its options, data formats) is checked by
    `tunelab.api.load_config`, which every command uses."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = RunConfig(**raw)
    except ValidationError as e:
        raise UserError(explain_validation_error(e)) from None
    if path is not None and cfg.output.name is None:
        cfg.output.name = Path(path).stem
    return cfg
