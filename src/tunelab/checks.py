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

    methods.options(cfg)
    check_data_formats(cfg.data)
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
    if cfg.training.activation_offloading is True:
        import torch

        if not torch.cuda.is_available():
            raise UserError("config key 'training.activation_offloading': it moves activations from GPU to CPU "
                            "memory and no CUDA device is visible; set it to auto (off on a CPU) or false")


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
    layers = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if n]
    names = {n for n, m in layers if isinstance(m, kinds) or type(m).__name__ == "Conv1D"}
    linear = sorted({n for n, m in layers if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
                    - {"lm_head", "score"})
    missing = [t for t in a.target_modules if t not in names]
    if missing:
        raise UserError(f"config key 'adapter.target_modules': {', '.join(repr(m) for m in missing)} "
                        f"{'matches' if len(missing) == 1 else 'match'} no module of {cfg.model.source}"
                        f"{suggest(missing[0], linear)}; its linear layers: {', '.join(linear)} (or all-linear)")
