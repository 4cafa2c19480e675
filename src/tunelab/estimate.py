"""`tunelab estimate`: a run's peak memory and time, predicted before any weights load.

The architecture comes from config.json alone: transformers builds the model on the `meta` device (shapes, no
storage), which gives exact parameter counts and the linear layers an adapter attaches to for any architecture.
Memory is the sum of parts, each a plain formula below:

  weights      parameters x bytes of the dtype the run loads them in (4-bit/8-bit layers for QLoRA/8-bit)
  adapter      trainable adapter parameters (float32)
  gradients    one float32 value per trainable parameter
  optimizer    bytes per trainable parameter by optimizer (AdamW 8, 8-bit AdamW 2, SGD 0)
  activations  tensors the backward pass keeps, per token and layer, times the largest batch (batch x longest sample;
               two sequences a row for DPO/ORPO/SimPO/reward, which run chosen and rejected in one forward);
               with gradient checkpointing each layer's input (on CPU with glibc's allocator CPU_CHECKPOINT_KEPT
               hidden-sized vectors a token, as measured), plus one layer recomputed
  autocast     where a float32 base runs under bf16 autocast on CPU (full fine-tuning, IA3, prompt learning, GRPO), the
               bf16 copy of every matmul weight kept for backward (a LoRA/DoRA base loads in bf16: models.base_dtype)
  loss         logits of the positions the loss scores (preference methods: every position's, as TRL computes them;
               a reward model's score head: none)
  (method)     what the method adds, declared in its own file (Method.extra_memory): GRPO and PPO the keys and values
               of a generation batch (kv_cache), GRPO on a bf16 CPU with LoRA the bf16 copy of the merged policy that
               rollouts sample from (sampler), PPO with full fine-tuning the frozen reference copy (reference),
               distillation the frozen teacher's weights (teacher)
  runtime      CPU: the process' own resident memory before the model loads (Python, torch, the tokenized data), since
               the run's peak is measured as the process high-water mark; GPU: 0 (the allocator peak excludes it)

On CPU the activations are scaled by CPU_RESIDENT_FACTOR (resident memory exceeds the live tensors). The sum is the
peak of a run's first steps; on CPU the peak over a whole run is that times CPU_RUN_GROWTH or the method's own
factor (Estimate.run_peak_mb), which budgets are compared with.
The per-token activation coefficients were measured with `torch.autograd.graph.saved_tensors_hooks` on SmolLM2-135M
(Llama layout) on CPU: bf16 autocast over float32 weights keeps ~5.5 bytes per element of the linear layers' inputs
(6·hidden + intermediate per token and layer), LoRA dropout adds ~4 more (its float32 output), and a float32 or bf16
model keeps ~8 and ~4. GPU figures use the same layout with bf16 activations and are unverified until a GPU run.

Time per optimizer step is the sum of two parts:

  training     the step's FLOPs over the device's peak times the share of it a step reaches (DEVICES mfu): forward
               and backward per trained token (a frozen base needs input gradients only), once per training pass
               (Method.training_passes: PPO's ppo_epochs), plus forward-only passes (a reference model, the scoring
               of sampled sequences, Method.frozen_forwards: distillation's teacher). On CPU, passes over frozen
               weights kept in float32 under autocast or in 4-bit run slower per FLOP, and DoRA's step too
               (estimate_time.CPU_STORAGE_SLOWDOWN, the adapter table's cpu_step_factor); the loss head costs
               per logit where it is not the lean loss (Method.loss_head, estimate_time.CPU_HEAD_FLOPS: TRL's
               chunked head scores every position off Triton devices), and each pass a fixed cost per layer
               (estimate_time.CPU_LAYER_PASS_FLOPS). Tokens are the batch's
               at the rows' token statistics (token_stats: the rows' lengths, each batch padded to its longest,
               pairs grouped by length); a method that samples trains on its prompts with the completions appended
  generation   what a method samples before it trains (Method.generation: GRPO, PPO): the prompts' forward, then a
               decoding step per new token bound by memory bandwidth or per-layer overhead (estimate_time)
A GPU's peak is its data sheet's; a CPU's is measured when the estimate is for the CPU it runs on (estimate_time),
since CPUs have no data sheet figure and their speed varies with load. The decoding constants are first guesses,
calibrated against measured steps by benchmarks/estimate_accuracy.py.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace

from tunelab import distributed, estimate_time, methods, models
from tunelab.adapters import ADAPTERS
from tunelab.errors import UserError
from tunelab.methods.contract import TRL_HEAD_TILE, EstimateContext

GB = 2**30
MB = 2**20

# Dense bf16 (T4: fp16) tensor throughput from the vendors' data sheets, memory in GiB, and the share of peak a
# LoRA/SFT step reaches (model FLOPs utilization). CPU: a 2-core AMX machine, whose bf16 matmul reaches ~2-2.5
# TFLOP/s (2048x2048 operands); a SmolLM2-135M LoRA step reaches ~17% of that on its FLOPs plus a fixed cost per
# pass (estimate_time.CPU_LAYER_PASS_FLOPS; fitted on configs/qa/lora.yaml, 1,457 tokens a micro-batch, and
# configs/preference/reward-hh.yaml, 5,914), since at this size the step is dominated by element-wise work,
# attention and the adapters' rank-16 matmuls. That
# CPU figure stands in only for `--device cpu` asked on a GPU machine: an estimate for the CPU it runs on measures
# that CPU's matmul throughput instead (estimate_time.cpu_matmul_flops), and the utilization share applies to it.
#
# price_per_hour: a default rental price in USD per device-hour, for the cost line; pass --price-per-hour for your own.
# GPUs: typical on-demand list prices at GPU clouds in 2026 (H100 SXM ~$2.50-3.50, A100 80GB ~$1.10-1.50, RTX 4090
# ~$0.69 at RunPod, T4 ~$0.35 at Google Cloud; hyperscalers charge up to twice as much, spot and reserved less).
# CPU: a small 2-vCPU cloud instance (~$0.09 an hour on-demand). Defaults, not quotes.
#
# bandwidth_gbs: memory bandwidth in GB/s, which bounds a decoding step (GRPO/PPO sampling, estimate_time): the data
# sheets' (H100 SXM HBM3, A100 80GB HBM2e, RTX 4090 GDDR6X, T4 GDDR6); CPU: the 2-core machine's, a first guess
# (estimate_time.CPU_BANDWIDTH_GBS_PER_CORE, which an estimate for this machine's CPU scales by its threads).
DEVICES = {
    "cpu": {"flops": 2.0e12, "memory_gb": None, "mfu": estimate_time.MATRIX_UNIT_MFU, "bf16": True,
            "price_per_hour": 0.09, "bandwidth_gbs": 10},
    "h100": {"flops": 989e12, "memory_gb": 80, "mfu": 0.4, "bf16": True, "price_per_hour": 2.99,
             "bandwidth_gbs": 3350},
    "h200": {"flops": 989e12, "memory_gb": 141, "mfu": 0.4, "bf16": True, "price_per_hour": 3.79,
             "bandwidth_gbs": 4800},
    "a100": {"flops": 312e12, "memory_gb": 80, "mfu": 0.4, "bf16": True, "price_per_hour": 1.29,
             "bandwidth_gbs": 2039},
    "4090": {"flops": 165e12, "memory_gb": 24, "mfu": 0.4, "bf16": True, "price_per_hour": 0.69,
             "bandwidth_gbs": 1008},
    "t4": {"flops": 65e12, "memory_gb": 16, "mfu": 0.3, "bf16": False, "price_per_hour": 0.35,
           "bandwidth_gbs": 320},
}

# Optimizer state bytes per trainable parameter (TrainingArguments `optim` names).
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8, "adamw_8bit": 2,
                   "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2, "paged_adamw_32bit": 8, "lion_8bit": 1,
                   "lion_32bit": 4, "paged_lion_8bit": 1, "paged_lion_32bit": 4, "sgd": 0, "adafactor": 4,
                   "adagrad": 4, "rmsprop": 4}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COMPUTE_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the dtype a precision's matmuls run in

# On CPU the peak is the process' resident memory, and glibc's allocator keeps some of the forward's freed
# intermediates resident. How much changes from run to run of the same input and grows over the first steps: the
# quickstart peaks at ~3,215 MB after 1-3 steps in about one run of three, ~4,100 MB in the others (same data and
# loss; malloc's in-use bytes equal, 2,039 MB, while the heap holds ~0 or ~900 MB of free blocks), ~4,450 MB after 6
# steps and ~4,700 MB over a whole quickstart run. Neither the mmap threshold, arena count, thread count nor hash
# seed changed that. The factor on the activations kept for backward (1,430 MB there) puts the estimate between the
# lowest and the highest (0.83 and 1.15 of it).
CPU_RESIDENT_FACTOR = 1.65
# With gradient checkpointing, glibc's heap keeps far more than the layers' inputs: each layer's intermediates are
# freed in the forward and made again in the backward's recompute, and the heap holds the freed blocks. Five CPU
# configs with checkpointing (float32, a 2-core AVX2 EPYC, first 3 steps) peaked at 1.36-1.88 of the estimate that
# counted one hidden-sized vector a token and layer; this many, under CPU_RESIDENT_FACTOR, puts them at 0.94-1.11. On
# jemalloc the quickstart with checkpointing peaked at 1.02 of the one-vector estimate, so a process on jemalloc
# counts one (benchmarks/RESULTS.md, "Gradient checkpointing on CPU"). Not yet measured with bf16 autocast.
CPU_CHECKPOINT_KEPT = 7

# The parts above are of the peak of a run's first steps (what benchmarks/estimate_accuracy.py measures). Over a whole
# run on CPU the resident peak keeps growing for a while, as glibc's heap holds freed blocks that batches of other
# shapes do not reuse: the quickstart's is ~2,100 MB after its first step, ~2,900 MB after 56 steps, and its
# high-water mark 3,120-3,200 MB, 1.42-1.46 of its 2,201 MB estimate (three runs); reward-hh's over an epoch 1.20-1.25,
# full fine-tuning 1.05, GRPO 1.13, distillation 1.24, PPO 1.38. The same quickstart with jemalloc (LD_PRELOAD) peaks
# at 2,669 MB at the same speed. Estimate.run_peak_mb scales the sum by this factor on CPU (the highest ratio measured,
# with a little room), and the memory plan and `fits` use that, since a run that outgrows memory late fails as surely
# as one that does at its first step (benchmarks/RESULTS.md "A whole run's memory on CPU"). The preference methods that
# hold pairs' full logits grow more (DPO 1.51, ORPO 1.64) and declare their own (Method.cpu_run_growth).
CPU_RUN_GROWTH = 1.55
# A process on jemalloc (LD_PRELOAD) holds far less: the quickstart 1.22, configs/qa/qlora.yaml 1.01 (glibc: 1.37),
# the DPO run above 1.06 (same losses, same speed).
JEMALLOC_RUN_GROWTH = 1.22


def jemalloc_loaded() -> bool:
    """Whether jemalloc is this process' allocator (LD_PRELOAD; Linux /proc names it)."""
    try:
        with open("/proc/self/maps") as f:
            return "libjemalloc" in f.read()
    except OSError:
        return False


def cpu_run_growth(glibc: float = CPU_RUN_GROWTH) -> float:
    """This process' whole-run growth on CPU: JEMALLOC_RUN_GROWTH where jemalloc is loaded into it, else `glibc` (a
    method's own, Method.cpu_run_growth, or CPU_RUN_GROWTH)."""
    return JEMALLOC_RUN_GROWTH if jemalloc_loaded() else glibc


@dataclass
class Estimate:
    device: str
    weight_dtype: str
    params: int
    trainable: int
    tokens_per_step: float
    peak_tokens: int
    memory_mb: dict = field(default_factory=dict)
    flops_per_step: float = 0.0  # training FLOPs (forward and backward passes, frozen models' forwards); generation
    # is timed apart
    seconds_per_step: float = 0.0
    steps: int | None = None
    budget_gb: float | None = None
    layers: int = 0  # transformer blocks: the unit FSDP and ZeRO-3 gather whole (per_process)
    price_per_hour: float = 0.0  # USD per device-hour
    devices: int = 1  # the devices a step runs on (one per data-parallel process), each paid for
    price_is_default: bool = True  # the device's default price (DEVICES), not one the user gave
    peak_flops: float = 0.0  # FLOP/s the step time is computed from (before the device's utilization share)
    peak_source: str = ""  # where peak_flops comes from: "<device> data sheet", "CPU bf16 matmul measured", "given"
    mfu: float = 0.0  # the share of peak_flops a step's work runs at (DEVICES; on this CPU by what runs its matmuls)
    generation_seconds_per_step: float = 0.0  # of seconds_per_step, the time sampling takes (GRPO, PPO)
    # a whole run's peak over the first steps' (CPU: Method.cpu_run_growth or CPU_RUN_GROWTH; a GPU's allocator: 1)
    run_growth: float = 1.0

    @property
    def cost_per_step(self) -> float:
        """USD for one optimizer step at price_per_hour, on every device the step runs on."""
        return self.seconds_per_step / 3600 * self.price_per_hour * self.devices

    @property
    def cost_total(self) -> float | None:
        """USD for the whole run (None when the number of steps is unknown)."""
        return None if self.steps is None else self.steps * self.cost_per_step

    @property
    def total_mb(self) -> float:
        return sum(self.memory_mb.values())

    @property
    def run_peak_mb(self) -> float:
        """The peak over a whole run: total_mb is the first steps' (see CPU_RUN_GROWTH)."""
        return self.total_mb * self.run_growth

    @property
    def fits(self) -> bool | None:
        return None if self.budget_gb is None else self.run_peak_mb <= self.budget_gb * 1024

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory_mb"] = {k: round(v, 1) for k, v in self.memory_mb.items()}
        d.update(total_mb=round(self.total_mb, 1), run_peak_mb=round(self.run_peak_mb, 1), fits=self.fits,
                 cost_per_step=self.cost_per_step, cost_total=self.cost_total)
        return d

    def report(self) -> str:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in self.memory_mb.items() if v >= 0.5)
        first = " at the first steps" if self.run_growth != 1 else ""
        allocator = "jemalloc is loaded" if self.run_growth == JEMALLOC_RUN_GROWTH else "less with jemalloc"
        lines = [f"estimate ({self.device}): peak memory{first} {self.total_mb:,.0f} MB = {parts} (MB)",
                 f"  {self.params / 1e6:.1f}M params in {self.weight_dtype}, {self.trainable / 1e6:.2f}M trainable; "
                 f"largest batch {self.peak_tokens} tokens",
                 *([f"  over a whole run up to ~{self.run_peak_mb:,.0f} MB (x{self.run_growth:g}: on CPU the heap "
                    f"grows as batches change shape; {allocator})"] if self.run_growth != 1 else []),
                 f"  time: {self.flops_per_step / 1e12:.2f} TFLOP per step; peak: {self.peak_source} at "
                 f"{self.peak_flops / 1e12:.3g} TFLOP/s; ~{_duration(self.seconds_per_step)} per step" +
                 (f" (generating ~{_duration(self.generation_seconds_per_step)})"
                  if self.generation_seconds_per_step else "") +
                 (f", ~{_duration(self.steps * self.seconds_per_step)} for {self.steps} steps" if self.steps else ""),
                 f"  cost at ${self.price_per_hour:g} per hour" +
                 (f" x {self.devices} devices" if self.devices > 1 else "") +
                 (f" (default for {self.device}, a typical on-demand price; set yours with --price-per-hour)"
                  if self.price_is_default else "") +
                 f": {_money(self.cost_per_step)} per step" +
                 (f", {_money(self.cost_total)} for {self.steps} steps" if self.steps else "")]
        if self.budget_gb is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.budget_gb:g} GB")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _money(usd: float) -> str:
    """Dollars with two significant digits below a cent (a step's cost often is a fraction of one), plain decimals."""
    import math

    if usd == 0 or usd >= 0.01:
        return f"${usd:,.2f}"
    if usd < 1e-6:
        return "< $0.000001"
    return f"${usd:.{1 - math.floor(math.log10(usd))}f}"


def config_json(source: str, revision=None, trust_remote_code: bool = False):
    """The model's transformers config, read without loading weights (a hub id needs the network)."""
    from transformers import AutoConfig

    from tunelab.models import resolve_source

    try:
        return AutoConfig.from_pretrained(resolve_source(source, revision), revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of model '{source}': {str(e).splitlines()[0]}") from None


def architecture(mcfg) -> dict:
    """Parameter counts and linear layers of a model config, from a storage-less (`meta`) instance."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg)
    out_emb = model.get_output_embeddings()
    # GPT-2 style models use transformers' Conv1D (a linear layer with its weight stored as in x out); PEFT's LoRA,
    # IA3 and bitsandbytes treat it as a linear layer, so it counts as one here.
    linears = [(name, m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (name, m.nx, m.nf)
               for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not out_emb]
    text = mcfg.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": sum(i * o for _, i, o in linears),
        "linears": linears,
        "head_params": out_emb.weight.numel() if out_emb is not None else 0,
        "layers": text.num_hidden_layers, "hidden": hidden, "heads": heads, "head_dim": head_dim,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "intermediate": getattr(text, "intermediate_size", None) or 4 * hidden,
        "vocab": text.vocab_size,
    }


def adapter_params(cfg, arch: dict) -> int:
    """Trainable parameters of the configured adapter (the adapter table's count; full fine-tuning: every one)."""
    return ADAPTERS[cfg.adapter.type].params(cfg.adapter, arch)


def runtime_mb() -> float:
    """This process' resident memory now (Linux /proc; else the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lean_loss_possible(cfg) -> bool:
    """Whether the run can take the lean loss at all: it calls the decoder directly, which prompt learning's virtual
    tokens rule out (methods/lean.py's lean_loss_supported), so those runs take TRL's own loss."""
    return not ADAPTERS[cfg.adapter.type].prompt_learning


def estimate(cfg, device: str = "cpu", budget_gb: float | None = None, *, price_per_hour: float | None = None,
             mean_tokens: float | None = None,
             max_tokens: int | None = None, trained_fraction: float = 0.5, num_samples: int | None = None,
             baseline_mb: float | None = None, arch: dict | None = None, lean_loss: bool | None = None,
             gradient_checkpointing: bool | None = None, activation_offloading: bool | None = None,
             peak_flops: float | None = None, world_size: int = 1) -> Estimate:
    """Predict peak memory (MB, by part) and step time of `cfg` on `device`.

    mean_tokens / max_tokens: token length statistics of the training samples (default: data.max_length);
    trained_fraction: share of tokens with a loss; baseline_mb: the runtime's own memory (CPU; default: this process).
    lean_loss / gradient_checkpointing / activation_offloading: the settings to estimate (default: the config's;
    `auto` counts as off).
    num_samples: the training rows, where known; a batch (and a step) holds at most a process' share of them, its
    ceil(num_samples / world_size) of `world_size` data-parallel processes, however large training.batch_size is.
    price_per_hour: USD per device-hour for the cost (default: the device's typical on-demand price, DEVICES).
    peak_flops: the device's peak FLOP/s to compute the time from. Default: a GPU's data sheet figure (DEVICES); for
    device "cpu" on a machine without a GPU, this CPU's matmul throughput in the run's compute dtype, measured once
    per process (estimate_time.cpu_matmul_flops, ~0.5 s), since a CPU has no data sheet figure and its speed varies
    with the machine and its load; DEVICES["cpu"] (a 2-core AMX machine) where the CPU is not this machine's.
    """
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}'; known: {', '.join(DEVICES)}")
    if price_per_hour is not None and not price_per_hour >= 0:  # `not >=` also refuses NaN
        raise UserError(f"--price-per-hour {price_per_hour}: give a price of 0 or more (USD per device-hour)")
    dev = DEVICES[device]
    gpu = device != "cpu"
    method, opts = methods.options(cfg)
    if arch is None:  # the model that trains (a method may change it: distill's student has fewer layers)
        arch = architecture(method.student_config(opts, config_json(cfg.model.source, cfg.model.revision,
                                                                    cfg.model.trust_remote_code)))
    t, q = cfg.training, cfg.quantization
    here = not gpu and local_device() == "cpu"  # the CPU this process runs on: measurable, and auto resolvable
    precision = t.precision
    if precision == "auto":
        precision = (models.resolve_precision("auto") if here else "bf16" if dev["bf16"] else
                     ("fp16" if gpu else "fp32"))
    wdtype = models.base_dtype(cfg, precision, gpu, method.float32_base)
    wbytes = DTYPE_BYTES[wdtype]
    adapter_type = ADAPTERS[cfg.adapter.type]
    full = adapter_type.trains_base

    # weights
    n, n_lin = arch["params"], arch["linear_params"]

    def weight_bytes(a: dict) -> float:
        if q.bits == 4:  # packed 4-bit + block constants (64 per block; double quant stores them in 8 bits)
            qbytes = 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)
            # prepare_model_for_kbit_training casts the layers left unquantized (embeddings, norms, head) to float32
            return a["linear_params"] * qbytes + (a["params"] - a["linear_params"]) * 4
        if q.bits == 8:
            return a["linear_params"] * 1 + (a["params"] - a["linear_params"]) * 4
        return a["params"] * wbytes

    weights = weight_bytes(arch)
    trainable = adapter_params(cfg, arch)
    adapter = 0 if full else trainable * 4
    grads = trainable * 4
    opt = trainable * OPTIMIZER_BYTES.get(t.optimizer, 8)

    # activations of the largest batch
    L, h, inter = arch["layers"], arch["hidden"], arch["intermediate"]
    max_len = min(max_tokens or cfg.data.max_length, cfg.data.max_length)
    mean_len = min(mean_tokens or max_len, max_len)
    virtual = adapter_type.virtual_inputs(cfg.adapter)  # prompt tuning's tokens come on top of data.max_length
    max_len, mean_len = max_len + virtual, mean_len + virtual
    if lean_loss is None:  # the method's own choice (SFT: lean unless `loss: fused`)
        lean_loss = method.lean_loss(opts)
    lean_loss = lean_loss and lean_loss_possible(cfg)
    # Liger's kernels (SFT on a GPU) patch RMSNorm, SwiGLU and RoPE, which keep fewer activations
    liger = gpu and method.uses_liger(opts, cuda=True)
    # preference methods (DPO, ORPO, SimPO, reward) run chosen and rejected through one forward: two sequences a row
    rows = method.sequences_per_row
    ctx = EstimateContext(arch=arch, gpu=gpu, precision=precision, weight_dtype=wdtype, quant_bits=q.bits,
                          peak_tokens=0, peak_sequences=0, scored_tokens=0.0, lean_loss=lean_loss,
                          adapter=cfg.adapter,
                          weight_bytes=weight_bytes,
                          architecture=lambda source: architecture(
                              config_json(source, trust_remote_code=cfg.model.trust_remote_code)))
    # a method that samples first (GRPO, PPO) trains on its prompts with the sampled completions appended
    gen = method.generation(cfg, opts, ctx)
    if gen:
        max_len += gen.new_tokens
    # A batch holds at most the rows there are: a batch_size above a small dataset's rows (or above one process'
    # share of them, as the distributed sampler splits them: training_steps) takes them all, and a step can take no
    # more than that however many batches it accumulates.
    share = math.ceil(num_samples / max(world_size, 1)) if num_samples else None
    batch = min(t.batch_size, share) if share else t.batch_size
    step_rows = min(t.batch_size * t.grad_accum, share) if share else t.batch_size * t.grad_accum
    passes = math.ceil(step_rows / batch)  # micro-batches a step runs (grad_accum, unless the rows run out first)
    # the sequences one forward+backward holds (PPO splits its rollout batch into num_mini_batches)
    peak_sequences = max(batch // method.micro_batches(opts), 1) * rows
    peak_tokens = peak_sequences * max_len
    autocast = not gpu and wdtype == "float32" and precision in ("bf16", "fp16")
    # bf16 on a GPU: 5 B per element (H100, Llama-3.2-1B shape, LoRA, batch 16: 4.9 measured from the allocator peak)
    per_elem = 5.5 if autocast else (8.0 if precision == "fp32" else (5.0 if gpu else 4.0))
    per_elem += adapter_type.activation_bytes(cfg.adapter, autocast or precision == "fp32")
    per_token_layer = per_elem * (6 * h + inter)
    if gradient_checkpointing is None:
        gradient_checkpointing = t.gradient_checkpointing is True
    if activation_offloading is None:
        activation_offloading = gpu and t.activation_offloading is True
    stream_bytes = 4 if autocast or precision == "fp32" else 2
    # Offloading (TRL's OffloadActivations) moves what backward keeps to CPU memory and prefetches it one layer
    # ahead: the device holds about two layers' worth, the one computing and the one in flight (unmeasured on a GPU).
    kept_layers = 2 if activation_offloading else L
    if gradient_checkpointing:  # each layer's input kept, one layer's activations alive during recompute
        kept = 1 if gpu or (here and jemalloc_loaded()) else CPU_CHECKPOINT_KEPT
        act = peak_tokens * (kept_layers * h * stream_bytes * kept + per_token_layer)
    else:
        act = peak_tokens * min(kept_layers, L) * per_token_layer
    if not gpu:
        act *= CPU_RESIDENT_FACTOR
    if gpu and q.bits:
        # prepare_model_for_kbit_training casts norms and embeddings to float32, so the residual stream is float32
        # (H100, QLoRA vs LoRA at the same batch: 1.66x the activations, measured)
        act *= 1.66
    if liger:  # H100, 1B LoRA: 0.75x the activations with Liger's kernels (measured)
        act *= 0.75
    autocast_copies = n_lin * 2 + (arch["head_params"] * 2 if lean_loss else 0) if autocast else 0
    scored = peak_tokens * (trained_fraction if lean_loss else 1.0)
    ctx = replace(ctx, peak_tokens=peak_tokens, peak_sequences=peak_sequences, scored_tokens=scored)
    loss = method.loss_memory(opts, ctx)  # the method's own (preference: full logits; a score head: none)
    if loss is None:  # a causal LM loss
        if lean_loss:  # bf16/float logits, their float32 copy, and softmax/gradient of the same size
            loss = scored * arch["vocab"] * (2 + 4 + 4)
        elif liger:
            # Liger's fused linear cross-entropy works in chunks; what it kept at the peak was 0.7-2.9 GB on the H100
            # runs (1B, 128k vocabulary, 6,752 tokens; with and without gradient checkpointing): 1.5 B per logit
            loss = peak_tokens * arch["vocab"] * 1.5
        else:  # TRL's chunked head: a chunk of logits at a time
            loss = min(scored, TRL_HEAD_TILE[0]) * arch["vocab"] * 8

    memory = {"runtime": 0.0, "weights": weights / MB, "adapter": adapter / MB, "gradients": grads / MB,
              "optimizer": opt / MB, "activations": act / MB, "autocast": autocast_copies / MB, "loss": loss / MB}
    # what the method adds besides (GRPO/PPO: a generation KV cache; distill: the teacher; PPO: a reference copy)
    memory.update({part: b / MB for part, b in method.extra_memory(cfg, opts, ctx).items()})
    if not gpu:
        memory["runtime"] = runtime_mb() if baseline_mb is None else baseline_mb

    # FLOPs: forward 2 per parameter per token plus attention (QK^T and AV over the mean length); backward doubles the
    # forward for a full fine-tune, and with a frozen base needs only input gradients (~1x forward, attention 2x).
    # A method that samples first (GRPO, PPO) trains on its prompts with the sampled completions appended.
    seq = mean_len + gen.new_tokens if gen else mean_len
    attn = 4 * L * seq * arch["heads"] * arch["head_dim"]
    # a score head (reward model) replaces the vocabulary projection, whose matmul a tied embedding's count stands for
    dense = n - (arch["head_params"] if method.task == "SEQ_CLS" else 0)
    fwd = 2 * dense + attn
    bwd = 2 * fwd if full else (2 * dense + 2 * attn + 4 * trainable)
    if gradient_checkpointing:
        bwd += fwd
    tokens_per_step = step_rows * seq * rows
    # every training pass (PPO: ppo_epochs) runs forward and backward; forward-only passes (a reference model; KTO's
    # KL baseline) score as many tokens again each
    flops = tokens_per_step * (method.training_passes(opts) * (fwd + bwd) + method.forward_only_passes(opts) * fwd)
    if gen:  # forward-only passes over the sampled sequences (the sampling policy's log-probs, a KL reference)
        flops += gen.sequences * seq * fwd * gen.scoring_forwards
    # other frozen models' forwards over the same tokens (distill: the teacher), loaded like the trained model
    frozen = method.frozen_forwards(cfg, opts, ctx)
    frozen_flops = tokens_per_step * sum(2 * a["params"] + 4 * a["layers"] * seq * a["heads"] * a["head_dim"]
                                         for a in frozen)
    # On CPU, frozen weights kept apart from the compute dtype (float32 under autocast, 4-bit) slow every pass that
    # reads them, and DoRA its own step (estimate_time.CPU_STORAGE_SLOWDOWN, the adapter table's cpu_step_factor).
    # The trained weights of a full fine-tune are cast once per forward, as bf16 weights are not at all.
    frozen_slow = 1.0 if gpu else estimate_time.cpu_slowdown(wdtype, q.bits, autocast)
    step_slow = 1.0 if gpu else adapter_type.cpu_step_factor * (1.0 if full else frozen_slow)
    # On CPU, TRL's chunked log-prob head costs far more than its matmul (estimate_time.CPU_HEAD_FLOPS), over every
    # position of each pass: forward and backward in training, forward in a reference's or sampler's scoring pass
    cpu_flops = 0.0
    if not gpu:
        per_position = estimate_time.CPU_HEAD_FLOPS["lean" if lean_loss else method.loss_head] * arch["vocab"]
        cpu_flops = tokens_per_step * per_position * (
            method.training_passes(opts) * (1 + estimate_time.CPU_HEAD_BACKWARD) + method.forward_only_passes(opts))
        if gen:
            cpu_flops += gen.sequences * seq * per_position * gen.scoring_forwards
        # and each pass over a micro-batch a fixed cost per layer, whatever its tokens (a forward a third of it)
        forward_layers = method.forward_only_passes(opts) * L + sum(a["layers"] for a in frozen)
        cpu_flops += estimate_time.CPU_LAYER_PASS_FLOPS * passes * (
            method.training_passes(opts) * method.micro_batches(opts) * L + forward_layers / 3)
        if gen:
            cpu_flops += estimate_time.CPU_LAYER_PASS_FLOPS * gen.scoring_forwards * L / 3 * gen.sequences / gen.batch
        # and the optimizer's step over the trained parameters (a full fine-tune's is seconds)
        cpu_flops += estimate_time.CPU_OPTIMIZER_FLOPS * trainable
    mfu = dev["mfu"]
    if peak_flops is not None:
        peak, peak_source = peak_flops, "given"
    elif here:
        peak, measured = estimate_time.cpu_matmul_flops(COMPUTE_DTYPE[precision])
        peak_source = f"CPU {next(p for p, d in COMPUTE_DTYPE.items() if d == measured)} matmul measured"
        mfu = estimate_time.cpu_utilization(measured)  # matrix units (AMX) or vector units reach different shares
    else:
        peak, peak_source = dev["flops"], f"{device} data sheet"
    generation = 0.0
    if gen:
        bandwidth = estimate_time.cpu_bandwidth() if here else dev["bandwidth_gbs"] * 1e9
        generation = estimate_time.generation_seconds(
            gen, arch, mean_len, weights if gen.weight_bytes is None else gen.weight_bytes, peak, mfu,
            bandwidth, estimate_time.DECODE_LAYER_SECONDS["gpu" if gpu else "cpu"])
    seconds = (flops * step_slow + frozen_flops * frozen_slow + cpu_flops) / (peak * mfu) + generation
    flops += frozen_flops
    steps = training_steps(cfg, num_samples, world_size)
    glibc = method.cpu_run_growth or CPU_RUN_GROWTH  # the whole run's growth on CPU, on glibc's heap
    if budget_gb is None and dev["memory_gb"]:
        budget_gb = dev["memory_gb"]
    return Estimate(device=device, weight_dtype=f"{wdtype}" + (f" + {q.bits}-bit linear" if q.bits else ""),
                    params=n, trainable=trainable, tokens_per_step=tokens_per_step, peak_tokens=peak_tokens,
                    memory_mb=memory, flops_per_step=flops, seconds_per_step=seconds, steps=steps,
                    budget_gb=budget_gb, layers=L,
                    price_per_hour=dev["price_per_hour"] if price_per_hour is None else price_per_hour,
                    price_is_default=price_per_hour is None, peak_flops=peak, peak_source=peak_source, mfu=mfu,
                    generation_seconds_per_step=generation,
                    run_growth=1.0 if gpu else cpu_run_growth(glibc) if here else glibc)


def per_process(est: Estimate, dcfg, nproc: int, steps: int | None = None) -> Estimate:
    """`est` (one process training alone) for one of `nproc` data-parallel processes under `dcfg.strategy`; `steps`:
    the run's steps with the rows split between the processes (training_steps with world_size), where known.

    Each process keeps its own activations and loss (its share of the global batch is `training.batch_size`); what
    the strategy shards is divided by `nproc`:

      ddp                      nothing: a full copy per process, plus DDP's gradient buckets (a flat copy of the
                               gradients it all-reduces)
      fsdp full_shard / hybrid weights (and adapter), gradients and optimizer state; the layer being computed is
                               gathered whole (one layer's weights on top)
      fsdp shard_grad_op       gradients and optimizer state (the weights stay whole between forward and backward)
      deepspeed ZeRO-2         gradients and optimizer state;  ZeRO-3: the weights too, one layer gathered whole
      offload                  fsdp_cpu_offload: the sharded parts live in CPU memory; zero_offload: the optimizer
                               state (stage 3: the weights too)
    hybrid_shard shards within a machine only; it is counted as full_shard over `nproc`, the processes of one machine.
    """
    if nproc <= 1:
        return est
    m = dict(est.memory_mb)
    s = dcfg.strategy
    if s == "ddp":
        m["ddp_buckets"] = m["gradients"]
    else:
        weights_sharded = (s == "fsdp" and dcfg.fsdp_sharding != "shard_grad_op") or (s == "deepspeed"
                                                                                      and dcfg.zero_stage == 3)
        offload = dcfg.fsdp_cpu_offload if s == "fsdp" else dcfg.zero_offload
        sharded = ["gradients", "optimizer"] + (["weights", "adapter"] if weights_sharded else [])
        for part in sharded:
            m[part] = m[part] / nproc
        if offload:  # in CPU memory, not on the device
            moved = ["optimizer"] + (["weights", "adapter"] if weights_sharded else []) + (
                ["gradients"] if s == "fsdp" else [])
            for part in moved:
                m[part] = 0.0
        if weights_sharded:  # the wrapped layer being computed is all-gathered whole
            m["gathered"] = est.memory_mb["weights"] / max(est.layers, 1)
    label = s if s != "deepspeed" else f"deepspeed ZeRO-{dcfg.zero_stage}"
    # each process takes its share of the rows: fewer steps, each paid for on every device
    out = Estimate(**{**asdict(est), "memory_mb": m, "devices": nproc,
                      "steps": est.steps if steps is None else steps})
    out.device = f"{est.device}, each of {nproc} processes, {label}"
    return out


def training_steps(cfg, num_samples: int | None, world_size: int = 1) -> int | None:
    """Optimizer steps of a run over `num_samples` rows, as transformers' Trainer counts them: each process' dataloader
    has ceil(rows per process / batch) batches (the distributed sampler pads every process to the same share), an
    epoch ends with a last, shorter accumulation (Trainer.set_initial_training_values), and epochs round up."""
    import math

    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    if not num_samples:
        return None
    batches = math.ceil(math.ceil(num_samples / world_size) / t.batch_size)
    per_epoch = max(batches // t.grad_accum + int(batches % t.grad_accum > 0), 1)
    return math.ceil(t.epochs * per_epoch)


def local_device() -> str:
    """The DEVICES entry for the machine this process runs on (an unknown GPU is treated as an A100)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((d for d in DEVICES if d != "cpu" and d in name), "a100")


def for_run(cfg, stats: dict, echo=print, lean_loss: bool | None = None):
    """The estimate `tunelab train` prints at start, from the prepared rows' token statistics (token_stats); None
    (with a note) when the architecture cannot be built on the meta device: the estimate is advice and never stops a
    run."""
    try:
        est = per_process(estimate(cfg, local_device(), lean_loss=lean_loss, world_size=distributed.world_size(),
                                   **stats), cfg.distributed,
                          distributed.world_size(),
                          training_steps(cfg, stats.get("num_samples"), distributed.world_size()))
    except Exception as e:  # noqa: BLE001  (any failure to model an architecture must not block training)
        echo(f"estimate: not available for this model ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None
    echo(est.report())
    return est


# Untokenized rows rendered for their lengths: at most this many, a fixed random sample (the longest row of a larger
# dataset may then be missed; the memory estimate's largest batch is capped at data.max_length either way)
STATS_SAMPLE = 2000


def token_stats(cfg, kind: str, rows: list[dict], tokenizer) -> dict:
    """estimate()'s token statistics of the prepared training rows of a kind of data (a method's `data`), so that the
    time counts the tokens a step computes. {} without rows, or where the tokenizer cannot render them.

    Tokenized rows (conversation): their lengths and trained share (stats_of); length-grouped batches (the default)
    pad little, so the mean length stands for a batch's. Rows TRL's trainers tokenize themselves (preference pairs,
    KTO examples): their rendered lengths, capped at data.max_length. max_tokens is the longest; mean_tokens the
    length a sequence takes in its batch, since these trainers pad every sequence of a batch (both of a pair's) to
    the batch's longest: drawn at random (KTO, or training.group_by_length off), 1,000 hh-rlhf pairs in batches of 4
    pad to 316 tokens against a mean of 179; pairs grouped by length (the default) pad to about their own length.
    Prompt rows (a method that generates): mean_tokens is the mean prompt; memory keeps counting the trained prompt
    and completion at data.max_length (no max_tokens), and the step count is left to training.max_steps, since a
    generating method's sampler repeats prompts.
    """
    from tunelab.data.build import sequence_lengths
    from tunelab.methods.preference import groups_pairs

    if not rows:
        return {}
    if "input_ids" in rows[0]:
        return stats_of(rows)
    num_samples = len(rows)
    if len(rows) > STATS_SAMPLE:  # rendering every row of a large dataset would cost more than the estimate is worth
        import random

        rows = random.Random(0).sample(rows, STATS_SAMPLE)
    try:
        lengths = sequence_lengths(kind, rows, tokenizer, cfg.data.max_length)
    except UserError:  # a template that cannot render a row: the estimate falls back to data.max_length
        return {}
    flat = [n for row in lengths for n in row]
    if kind == "prompt":
        return {"mean_tokens": sum(flat) / len(flat)}
    longest, t = [max(row) for row in lengths], cfg.training
    return {"mean_tokens": grouped_length(longest, t.batch_size, t.grad_accum) if groups_pairs(kind, t)
            else padded_length(longest, t.batch_size), "max_tokens": max(flat), "num_samples": num_samples}


def padded_length(lengths: list[int], batch: int) -> float:
    """The expected longest of `batch` lengths drawn at random without replacement from `lengths`: what every
    sequence of a randomly drawn batch is padded to. The i-th shortest is the longest of a draw in C(i, batch-1) of
    the C(n, batch) draws."""
    import math

    v, k = sorted(lengths), min(batch, len(lengths))
    return sum(v[i] * math.comb(i, k - 1) for i in range(k - 1, len(v))) / math.comb(len(v), k)


def grouped_length(lengths: list[int], batch: int, accum: int) -> float:
    """What a sequence is padded to, on average over an epoch, in batches of `batch` drawn by transformers'
    length-grouped sampler (random mega-batches of up to 50 optimizer steps' rows, each sorted by length), drawn by
    the sampler's own function at a fixed seed."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths, batch * accum, generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / len(order)


def stats_of(rows: list[dict]) -> dict:
    lengths = [len(r["input_ids"]) for r in rows]
    total = sum(lengths)
    trained = sum(sum(1 for x in r["labels"] if x != -100) for r in rows if "labels" in r)
    return {"mean_tokens": total / max(len(lengths), 1), "max_tokens": max(lengths, default=0),
            "trained_fraction": trained / total if total and trained else 0.5, "num_samples": len(rows)}


def main(args) -> int:
    import json

    from tunelab.checks import check_config
    from tunelab.config import read_config
    from tunelab.data.build import prepare
    from tunelab.models import load_tokenizer

    cfg = check_config(read_config(args.config, args.overrides))
    kind = methods.get(cfg.method.name).data
    stats = {}
    # a config mistake (model.chat_template) is refused as train refuses it; data the estimate can do without is not
    tokenizer = load_tokenizer(cfg.model.source, cfg.model.revision, cfg.model.trust_remote_code,
                               cfg.model.chat_template)
    try:  # the rows `tunelab train` would prepare (tokenized ones through the data cache), measured the same way
        stats = token_stats(cfg, kind, prepare(kind, cfg.data, tokenizer)[0], tokenizer)
    except UserError as e:
        # on stderr: stdout carries only the estimate, so that --json output parses
        print(f"note: token lengths not measured ({e}); using data.max_length", file=sys.stderr)
    est = per_process(estimate(cfg, args.device, args.budget_gb, price_per_hour=args.price_per_hour,
                               world_size=args.nproc, **stats),
                      cfg.distributed, args.nproc, training_steps(cfg, stats.get("num_samples"), args.nproc))
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.report())
    return 0 if est.fits is not False else 1
