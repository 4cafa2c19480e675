"""Memory-aware defaults: settings left at `auto` are chosen before the model loads, from tunelab's own estimate
against the memory the device has free, and printed in the pre-flight with the reason.

The levers trade speed for memory and none changes what is learned (the loss and its gradients are the same):

  loss                      SFT's `loss: auto`: the lean loss (fastest) holds the logits of the trained tokens;
                            TRL's chunked head ("fused") holds a chunk of them at a time
  gradient checkpointing    `training.gradient_checkpointing: auto`: off keeps every layer's activations; on keeps
                            each layer's input and recomputes the rest in backward (about a third more compute)
  activation offloading     `training.activation_offloading: auto` (GPU; methods on TRL's SFT trainer): what backward
                            keeps moves to CPU memory and back, overlapped with compute; tried last, after
                            checkpointing, since the copies cost time where the GPU is fast and the link slow

Candidates are tried fastest first (nothing saved; the loss alone; checkpointing alone; both; then the same with
offloading) and the first whose
estimate fits the budget wins. When none fits, the most frugal one is chosen and the reason says by how much it is
over, so the run still starts (the estimate is advice: it is within about 20% of the measured peak).

With several processes the plan is per process: the estimate of one process under the distributed strategy
(estimate.per_process: FSDP and ZeRO shard weights, gradients and optimizer state) against its share of the memory
(a GPU each, or the machine's CPU memory divided among its processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunelab import distributed
from tunelab.adapters import ADAPTERS
from tunelab.estimate import MB, estimate, lean_loss_possible, local_device, per_process

# Share of the free memory the estimate may fill: the estimate's own error (within ~20% of the measured peak,
# benchmarks/RESULTS.md) needs the rest. The estimate compared is of a whole run (Estimate.run_peak_mb: on CPU the
# heap's growth over a run included).
HEADROOM = 0.85


@dataclass
class Plan:
    gradient_checkpointing: bool
    lean_loss: bool
    estimate_mb: float
    budget_mb: float | None
    reason: str
    activation_offloading: bool = False


def free_memory_mb(device: str) -> float | None:
    """Memory this process may still fill: the GPU's free memory, or on a CPU MemAvailable (Linux); None if unknown."""
    if device != "cpu":
        import torch

        return torch.cuda.mem_get_info()[0] / MB
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def plan(cfg, method, opts, stats: dict, device: str | None = None, budget_mb: float | None = None) -> Plan:
    """The settings for `auto`: the fastest candidate whose estimate fits `budget_mb` (default: training.
    memory_budget_gb, else HEADROOM x the free memory of `device`, default this machine's device). Settings the
    config fixes are kept as they are."""
    device = device or local_device()
    if budget_mb is None and cfg.training.memory_budget_gb:
        budget_mb = cfg.training.memory_budget_gb * 1024
    if budget_mb is None:
        free = free_memory_mb(device)
        # the processes of one machine share its CPU memory; each GPU process has its own device
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
        budget_mb = free * HEADROOM / local if free is not None else None
    gc = cfg.training.gradient_checkpointing
    gc_choices = ((False, True) if ADAPTERS[cfg.adapter.type].checkpointing else (False,)) if gc == "auto" else (gc,)
    loss_choices = tuple(dict.fromkeys(lean and lean_loss_possible(cfg) for lean in method.loss_choices(opts)))
    off = cfg.training.activation_offloading
    if off == "auto":  # only where there is a faster memory to offload from, and a trainer that can
        off = (False, True) if device != "cpu" and method.activation_offloading else (False,)
    else:
        off = (off,)
    # fastest first: checkpointing costs more than the loss choice, offloading (with the most frugal rest) most
    candidates = [(g, lean, o) for o in off for g in (gc_choices if not o else gc_choices[-1:])
                  for lean in loss_choices]
    sizes = []
    for g, lean, o in candidates:
        # per process: what the strategy shards across the job's processes is divided among them
        total = per_process(estimate(cfg, device, gradient_checkpointing=g, lean_loss=lean, activation_offloading=o,
                                     world_size=distributed.world_size(), **stats),
                            cfg.distributed, distributed.world_size()).run_peak_mb
        sizes.append(total)
        if budget_mb is None or total <= budget_mb:
            break
    g, lean, o = candidates[len(sizes) - 1]
    total = sizes[-1]
    chosen = (f"gradient checkpointing {'on' if g else 'off'}, {'lean' if lean else 'chunked (fused)'} loss"
              + (", activations offloaded to CPU memory" if o else ""))
    if budget_mb is None:
        reason = f"{chosen} (free memory unknown: the fastest settings)"
    elif total <= budget_mb and len(sizes) == 1:
        reason = (f"{chosen}: the fastest settings fit ({total:,.0f} MB estimated over the run, {budget_mb:,.0f} MB "
                  "budget)")
    elif total <= budget_mb:
        reason = (f"{chosen}: the faster settings need {sizes[0]:,.0f} MB, over the {budget_mb:,.0f} MB budget; "
                  f"these need {total:,.0f} MB")
    else:
        reason = (f"{chosen}: does NOT fit even so ({total:,.0f} MB estimated over the run, {budget_mb:,.0f} MB "
                  "budget); lower training.batch_size or data.max_length, or use quantization.bits=4")
    return Plan(gradient_checkpointing=g, lean_loss=lean, estimate_mb=total, budget_mb=budget_mb, reason=reason,
                activation_offloading=o)


def resolve(cfg, method, opts, stats: dict, echo=print):
    """(run config, options, lean_loss) with `auto` resolved for this machine, the choice and its reason printed;
    `stats`: the training rows' token statistics (estimate.token_stats). A config without `auto` settings comes back
    unchanged. The plan is advice: where the estimate cannot model the model, the fastest settings are taken."""
    auto = ("auto" in (cfg.training.gradient_checkpointing, cfg.training.activation_offloading)
            or len(method.loss_choices(opts)) > 1)
    try:
        p = plan(cfg, method, opts, stats)
    except Exception as e:  # noqa: BLE001  (any failure to model an architecture must not block training)
        p = Plan(gradient_checkpointing=cfg.training.gradient_checkpointing is True,
                 lean_loss=method.loss_choices(opts)[0], estimate_mb=0.0, budget_mb=None,
                 reason=f"the fastest settings (no estimate for this model: {type(e).__name__})",
                 activation_offloading=cfg.training.activation_offloading is True)
    if auto:
        echo(f"memory plan: {p.reason}")
    run_cfg, run_opts = apply(cfg, method, opts, p)
    return run_cfg, run_opts, p


def apply(cfg, method, opts, p: Plan):
    """(cfg, opts) with the plan's choices in place of `auto` (copies; the run directory keeps the user's config)."""
    cfg = cfg.model_copy(deep=True)
    cfg.training.gradient_checkpointing = p.gradient_checkpointing
    cfg.training.activation_offloading = p.activation_offloading
    return cfg, method.with_lean_loss(opts, p.lean_loss) if len(method.loss_choices(opts)) > 1 else opts
