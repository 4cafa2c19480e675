"""Checks before anything is written: a run config against the layers it names (the method table: the method, its
options, the adapter types it trains with; the data layer: format names), against transformers (optimizer names,
TrainingArguments), against the loaded model (target modules) and against a checkpoint it starts from.
config.py, the lowest layer, validates the sections themselves and imports none of these; train, estimate, sweep
and the Python API call `check_config` before anything loads, train the rest before the run directory is written.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError, suggest


def check_config(cfg):
    """`cfg` unchanged, or a UserError (one line: the key, what is wrong, how to fix it)."""
    from tunelab import methods
    from tunelab.data.formats import check_config as check_data_formats
    from tunelab.models import check_source

    methods.options(cfg)
    if cfg.training.gradient_checkpointing is True and not ADAPTERS[cfg.adapter.type].checkpointing:
        raise UserError(f"training.gradient_checkpointing=true does not run with adapter.type={cfg.adapter.type} "
                        "(the first step fails); set training.gradient_checkpointing=auto or false")
    check_data_formats(cfg.data)
    try:
        check_source(cfg.model.source)
    except UserError as e:
        raise UserError(f"config key 'model.source': {e}") from None
    return cfg


def check_arguments(args: dict) -> None:
    """Build the shared TrainingArguments once as a check: transformers refuses some combinations only here (a
    scheduler argument of the wrong type, bf16 without hardware, ...). Its ValueError becomes one line."""
    from transformers import TrainingArguments

    try:
        TrainingArguments(**args)
    except ValueError as e:
        raise UserError(f"training settings refused by transformers: {str(e).strip().splitlines()[0]}") from None


def check_training(cfg) -> None:
    """Refusals of training.* values that only transformers knows (UserError, one line), before anything loads."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if cfg.training.optimizer not in names:
        raise UserError(f"config key 'training.optimizer': unknown optimizer '{cfg.training.optimizer}'"
                        f"{suggest(cfg.training.optimizer, names)}; e.g. adamw_torch, adamw_8bit, paged_adamw_8bit, "
                        "sgd, adafactor (transformers OptimizerNames)")
    _check_optimizer(cfg)
    _check_scheduler(cfg)
    _check_attention(cfg)
    if cfg.training.activation_offloading is True:
        import torch

        if not torch.cuda.is_available():
            raise UserError("config key 'training.activation_offloading': it moves activations from GPU to CPU "
                            "memory and no CUDA device is visible; set it to auto (off on a CPU) or false")


def _check_optimizer(cfg) -> None:
    """The optimizer class resolved as the Trainer resolves it, so an optimizer whose package is missing (galore_adamw,
    schedule_free_adamw, lomo, ...) is one line now rather than a traceback inside trainer.train()."""
    import torch
    from transformers import Trainer, TrainingArguments

    t = cfg.training
    args = TrainingArguments(output_dir="unused", optim=t.optimizer, learning_rate=t.learning_rate,
                             adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
                             weight_decay=t.weight_decay, use_cpu=not torch.cuda.is_available(), report_to="none")
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as e:
        raise UserError(f"config key 'training.optimizer': {t.optimizer} cannot be used here: "
                        f"{str(e).strip().splitlines()[0]}") from None


def _check_scheduler(cfg) -> None:
    """Build the learning-rate schedule with the run's arguments on a stand-in optimizer and evaluate it at a few
    steps, as the Trainer will: a wrong scheduler argument (a string where a number goes, a value get_scheduler
    refuses) fails here, before anything is written, instead of inside trainer.train()."""
    import math

    import torch
    from transformers import get_scheduler

    t = cfg.training
    total = t.max_steps if t.max_steps > 0 else 1000  # epoch-based: the step count is not known yet
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    try:
        schedule = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                 scheduler_specific_kwargs=dict(t.scheduler_kwargs))
        for step in sorted({0, warmup, warmup + 1, (warmup + total) // 2, total}):
            for rate in getattr(schedule, "lr_lambdas", ()):
                rate(step)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        texts = [k for k, v in t.scheduler_kwargs.items() if isinstance(v, str)]
        hint = f"; {', '.join(texts)} {'is' if len(texts) == 1 else 'are'} text, not a number" if texts else ""
        raise UserError(f"config key 'training.scheduler_kwargs': scheduler '{t.scheduler}' refused "
                        f"{dict(t.scheduler_kwargs)} ({str(e).strip().splitlines()[0]}){hint}") from None


# attention implementations that need a package, and transformers' check that it is installed
ATTENTION_PACKAGES = {"flash_attention_2": ("flash_attn", "is_flash_attn_2_available"),
                      "flash_attention_3": ("flash_attn_3", "is_flash_attn_3_available"),
                      "flash_attention_4": ("flash_attn_4", "is_flash_attn_4_available")}


def _check_attention(cfg) -> None:
    """model.attn_implementation against the names transformers accepts, and the package it needs installed."""
    name = cfg.model.attn_implementation
    if name is None or "/" in name:  # library default; a hub kernel (org/repo), which transformers fetches itself
        return
    import transformers.utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        raise UserError(f"config key 'model.attn_implementation': unknown attention '{name}'{suggest(name, known)}; "
                        f"known: {', '.join(known)} (or leave it unset for the library default)")
    package, available = ATTENTION_PACKAGES.get(name, (None, None))
    check = getattr(transformers.utils, available, None) if available else None
    if check is not None and not check():
        raise UserError(f"config key 'model.attn_implementation': {name} needs the {package} package (and a GPU it "
                        "supports), which is not installed; install it or use sdpa")


def resume_point(cfg, run) -> Path | None:
    """The checkpoint output.resume_from names, checked (exists, is a checkpoint, trained the same model, method,
    adapter and quantization), when the run is to start from it; None when there is none or the run already has
    checkpoints of its own (then it resumes from its last one, so re-running after an interruption continues)."""
    given = cfg.output.resume_from
    if not given:
        return None
    ckpt = Path(given).expanduser()
    if not ckpt.is_dir():
        raise UserError(f"config key 'output.resume_from': {given} is not a directory; give a checkpoint, e.g. "
                        "runs/NAME/checkpoints/checkpoint-N")
    if not (ckpt / "trainer_state.json").is_file():
        raise UserError(f"config key 'output.resume_from': {given} is not a training checkpoint (no "
                        "trainer_state.json); give a checkpoints/checkpoint-N directory")
    inside = ckpt.resolve().is_relative_to(run.dir.resolve())
    if inside and run.overwrite:
        raise UserError(f"config key 'output.resume_from': {given} is inside the run directory {run.dir}, which "
                        "--overwrite deletes; copy the checkpoint elsewhere or drop --overwrite")
    if run.resume_from is not None:
        if inside and ckpt.resolve() != run.resume_from.resolve():
            # resuming an earlier checkpoint of this run would make each later re-run go back there again
            raise UserError(f"config key 'output.resume_from': {given} is an earlier checkpoint of this run, which "
                            f"resumes from its last one ({run.resume_from.name}); remove output.resume_from, or start "
                            "a new run (output.name) from it")
        return None
    from tunelab import runs

    saved = runs._saved_config(ckpt / runs.CONFIG_COPY)
    if saved is not None:
        import yaml

        now = yaml.safe_load(cfg.to_yaml())
        for section in ("model", "method", "adapter", "quantization"):  # what the checkpoint's weights mean
            diff = runs._first_difference({section: now.get(section)}, {section: saved.get(section)})
            if diff:
                raise UserError(f"config key 'output.resume_from': {given} was trained with a different setting "
                                f"({diff.replace(' in the run', ' in the checkpoint')}); resume from a checkpoint "
                                "of the same model, method, adapter and quantization")
    return ckpt


def check_target_modules(cfg, model) -> None:
    """Refuse adapter.target_modules names that match no module of the loaded model (PEFT would raise a traceback
    while attaching), naming the model's linear layers."""
    a = cfg.adapter
    kind = ADAPTERS[a.type]
    if not isinstance(a.target_modules, list) or kind.trains_base or kind.prompt_learning:
        return  # all-linear, full fine-tuning, virtual tokens: nothing to match
    import torch

    # the layer kinds PEFT adapts (a block such as "mlp" matches a name but PEFT refuses it); bitsandbytes' 4/8-bit
    # layers subclass torch.nn.Linear, so QLoRA bases list the same names; GPT-2 style models use transformers' Conv1D
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    modules = [(n, m) for n, m in model.named_modules() if n]
    adaptable = [n for n, m in modules if isinstance(m, kinds) or type(m).__name__ == "Conv1D"]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"} - {"lm_head", "score"})

    def matches(target: str) -> bool:
        # PEFT's rule for a list of names: a module's full name equals the target or ends with "." + target, so
        # a path suffix such as self_attn.q_proj counts as well as the last part
        return any(n == target or n.endswith("." + target) for n in adaptable)

    missing = [t for t in a.target_modules if not matches(t)]
    if missing:
        raise UserError(f"config key 'adapter.target_modules': {', '.join(repr(m) for m in missing)} "
                        f"{'matches' if len(missing) == 1 else 'match'} no module of {cfg.model.source}"
                        f"{suggest(missing[0], linear)}; its linear layers: {', '.join(linear)} (or all-linear)")
