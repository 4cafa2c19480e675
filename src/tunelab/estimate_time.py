"""The step-time half of `tunelab estimate`: the throughput a step's FLOPs run at, what a CPU step costs besides its
FLOPs (how its frozen weights are stored, its loss head, a fixed cost per pass, the optimizer step: each measured in
real steps, benchmarks/RESULTS.md), and the time a method that samples before it trains (GRPO, PPO:
methods.contract.Generation) spends generating.

Peak: a GPU's is its data sheet's (estimate.DEVICES). A CPU has no such figure, and the one a run gets depends on the
machine and on what else runs there (the 2-core machine the CPU figures come from ran a 2048 x 2048 bf16 matmul at
0.7-2.0 TFLOP/s over one day), so an estimate for the CPU this process runs on measures it: a short matmul probe in
the dtype the run's matmuls compute in, once per process.

Generation, per generate call of `batch` sequences: the prompts' forward (prefill) at the training forward's share
of the peak, then one decoding step per new token. A decoding step reads every weight and the KV cache so far, or,
for a small model, is bound by the per-layer cost of running the layers one token at a time (Python, kernel
launches, small ops), whichever is longer, plus its matmuls at the peak:
    max((weight bytes + KV bytes) / bandwidth, layers x DECODE_LAYER_SECONDS) + batch x 2 x params / peak
"""

from __future__ import annotations

import time
from functools import lru_cache

# How much slower per FLOP a CPU step runs over frozen weights that are not kept in the dtype its matmuls compute in,
# against a step over bf16 weights (a LoRA base in bf16) or trained float32 weights under bf16 autocast (full
# fine-tuning), which both run at DEVICES["cpu"]["mfu"] of the peak (the quickstart and configs/qa/lora.yaml at
# 0.79-1.23x of that estimate over two days; a full fine-tune of the quickstart took 1.52x the LoRA step's time for
# 1.50x its FLOPs):
# - frozen float32 under bf16 autocast (prompt learning, IA3, GRPO's and a reward model's base, a distillation
#   teacher): autocast caches its bf16 copy only of weights that require grad, so a frozen float32 weight is cast
#   again at every matmul, and the residual stream stays float32. configs/qa/lora.yaml with `model.dtype: float32`
#   took 1.11x the step of its bf16 base; one LoRA forward+backward 1.07x (8 x 184 tokens) and 1.02-1.28x (16 x 368,
#   benchmarks/frozen_storage.py). Prompt learning, which this factor was once fitted on at 1.6, is slower for
#   another reason: TRL's loss head (CPU_HEAD_FLOPS);
# - 4-bit (bitsandbytes): every matmul dequantizes its weight first; configs/qa/qlora.yaml 1.43x and 1.71x.
CPU_STORAGE_SLOWDOWN = {"frozen float32": 1.1, "quantized": 1.45}

# The loss head on CPU, in FLOP-equivalents (work that takes as long as that many FLOPs of the step's matmuls) per
# logit, i.e. per position and vocabulary entry, of a forward; a backward costs CPU_HEAD_BACKWARD forwards more.
# "chunked" is TRL's fused log-prob head (DPO, KTO, GRPO, SFT with `loss: fused` or prompt learning): off Triton
# devices it scores *every* position in float32 tiles of 4,096 positions x 32,768 vocabulary entries, a dozen
# elementwise passes each, and recomputes the tiles in backward: trl.kernels.chunked_logprob alone (1,457 and 4,096
# positions, SmolLM2's 49,152 entries, probe 2.47 TFLOP/s) took 10 ns a logit forward (6.5 with log-probs only), 17
# more in backward; configs/qa/lora.yaml with `loss: fused` took 6.05 s a step against 2.49 with the lean loss.
# "logits" (ORPO's and SimPO's selective log-softmax over float32 logits, PPO's, logit distillation's): ~4 ns a logit,
# fitted on configs/preference/{orpo,simpo}-hh.yaml. The lean loss (trained positions only, one cross-entropy) and a
# score head are within DEVICES["cpu"]["mfu"]. FLOP-equivalents at that probe and utilization (0.17).
CPU_HEAD_FLOPS = {"chunked": 4200.0, "logits": 1700.0, "lean": 0.0, "score": 0.0}
CPU_HEAD_BACKWARD = 1.7

# A fixed cost of each pass over a micro-batch, per layer (forward and backward; a forward-only pass a third of it),
# in FLOP-equivalents: Python, dispatch and small ops that do not grow with the tokens. Fitted with
# DEVICES["cpu"]["mfu"] on two single-micro-batch steps of the same model: configs/qa/lora.yaml (1,457 tokens,
# 2.43 s) and configs/preference/reward-hh.yaml (5,914 tokens, 8.94 s), probe 2.3-2.4 TFLOP/s: 12 ms a layer.
CPU_LAYER_PASS_FLOPS = 5.0e9

# The optimizer step, per trained parameter, in the same FLOP-equivalents: AdamW reads and writes each parameter,
# its gradient and two moments. configs/distill/smollm2-half.yaml (a full fine-tune of an 81M-parameter student)
# spent 0.31 s a step there (py-spy, probe ~2.5 TFLOP/s); LoRA's few million parameters take milliseconds.
CPU_OPTIMIZER_FLOPS = 1600.0

# The probe: square operands of the size the CPU figures were measured at, a few warm-up products (thread pool,
# oneDNN/AMX kernel selection), then as many products as fit in PROBE_SECONDS, timed in PROBE_WINDOWS windows of
# which the fastest counts: one 0.3 s window read 1.35-2.1 TFLOP/s in runs whose steps took the same time
# (benchmarks/RESULTS.md, "Step time after the calibration"), a passing stall that the step does not share.
PROBE_SIZE = 2048
PROBE_WARMUP = 2
PROBE_SECONDS = 0.5
PROBE_WINDOWS = 5
# A dtype this CPU has no native kernel for (bfloat16 without AVX512-BF16 or AMX: ~50x slower than float32 on an
# AVX2 EPYC, about 20 s for one 2048-square product) is probed at a smaller size: the size doubles from
# PROBE_MIN_SIZE only while a product at the size reached takes under PROBE_GROW_SECONDS / 8 (the next size is 8x the
# work), so a slow dtype's products stay short and full-speed kernels still reach PROBE_SIZE.
PROBE_MIN_SIZE = 256
PROBE_GROW_SECONDS = 0.5

# The share of the probe's FLOP/s a training step reaches on CPU depends on what runs the matmuls. On AMX's matrix
# tiles (bf16 on the 2-core machine every figure above comes from) the probe's large square product runs far faster
# than a step's smaller, oddly shaped ones: DEVICES["cpu"]["mfu"], 0.17. On vector units (float32 anywhere; bf16 on
# a CPU without native bf16, where auto precision is float32) a step's matmuls run near the probe's rate: the
# quickstart in float32 on a 2-core AVX2 EPYC (probe 0.155 TFLOP/s) took 6.4 s a step where 0.17 predicted 27.6;
# CPU_VECTOR_MFU is fitted there with the fixed costs above unchanged (benchmarks/RESULTS.md, "Step time on a CPU
# without bf16 units"). Float32 on an AMX machine is assumed to behave alike (not measured). AVX512-BF16 without AMX
# (bf16 dot products in vector registers) lies between: on a 2-core AMD EPYC with it (bf16 probe 0.8 TFLOP/s,
# against AMX's 2.4) all 16 shipped CPU configs ran at 0.35-0.67 of the 0.17 estimate, 0.47 at the median;
# BF16_VECTOR_MFU = 0.17 / 0.47 (benchmarks/RESULTS.md, "Step time on a CPU with AVX512-BF16 and no AMX").
CPU_VECTOR_MFU = 0.73
MATRIX_UNIT_MFU = 0.17  # estimate.DEVICES["cpu"]["mfu"]: the machine the CPU constants were measured on
BF16_VECTOR_MFU = 0.36


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (what MATRIX_UNIT_MFU was measured on)."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the query: count the CPU as one without
        return False


def cpu_utilization(dtype: str) -> float:
    """The share of cpu_matmul_flops(dtype) a training step's work runs at on this CPU (see CPU_VECTOR_MFU)."""
    from tunelab.models import bf16_supported

    if dtype != "bfloat16" or not bf16_supported():
        return CPU_VECTOR_MFU
    return MATRIX_UNIT_MFU if has_amx() else BF16_VECTOR_MFU


# Decoding constants, checked against measured steps (benchmarks/estimate_accuracy.py).
# CPU memory bandwidth that one core's decoding reads weights at: ~10 GB/s on the 2-core machine (a first guess; a
# small model's step is bound by the per-layer cost below instead).
CPU_BANDWIDTH_GBS_PER_CORE = 5.0
# Per layer and decoding step (transformers' generate, eager). CPU: GRPO's rollouts on the idle 2-core machine
# (SmolLM2-135M, 30 layers, 8 completions of 96 tokens) took 8.7 s a step (rollout_seconds, the adapter's merge and
# the sampler's refresh included): ~90 ms a token step, where reading the bf16 weights takes ~27 ms. GPU: "GRPO
# generation on the GPU" in benchmarks/RESULTS.md (Llama-3.2-1B shape, 16 layers, 64 completions x 128 tokens at
# 3,001 tokens/s on an H100: 21 ms a step where reading the weights takes 0.9 ms; vLLM's CUDA graphs cost far less,
# uncounted).
DECODE_LAYER_SECONDS = {"cpu": 2.5e-3, "gpu": 1.3e-3}


@lru_cache(maxsize=None)
def cpu_matmul_flops(dtype: str) -> tuple[float, str]:
    """(FLOP/s, dtype measured) of a PROBE_SIZE square matmul (smaller where `dtype` runs slowly) on this CPU in
    `dtype` (bfloat16, float16, float32), with this process' torch threads. A dtype whose matmul this torch build
    cannot run on CPU falls back to float32. Cached: the probe runs once per process and dtype."""
    import torch

    # its own generator: the probe runs in the first run of a process only, between the run's seeding and the
    # adapter's random init, which drawing from the global RNG here would shift (a run's result would then depend on
    # whether an earlier run in the process had probed: a sweep's first trial, a test run alone)
    gen = torch.Generator().manual_seed(0)
    for name in (dtype, "float32"):
        n = PROBE_MIN_SIZE
        try:
            while True:
                a = torch.randn(n, n, dtype=getattr(torch, name), generator=gen)
                b = torch.randn(n, n, dtype=getattr(torch, name), generator=gen)
                for _ in range(PROBE_WARMUP):
                    start = time.perf_counter()
                    a @ b
                    took = time.perf_counter() - start
                if n >= PROBE_SIZE or took * 8 >= PROBE_GROW_SECONDS:  # the next size: 8x the work
                    break
                n *= 2
        except RuntimeError:  # e.g. no CPU kernel for the half type in this build
            continue
        rates = []
        for _ in range(PROBE_WINDOWS):
            count, start = 0, time.perf_counter()
            while True:
                a @ b
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= PROBE_SECONDS / PROBE_WINDOWS:
                    break
            rates.append(2 * n**3 * count / elapsed)
        return max(rates), name
    raise RuntimeError("no float32 matmul on this CPU")  # unreachable with any working torch


def cpu_slowdown(frozen_dtype: str, quant_bits: int | None, autocast: bool) -> float:
    """CPU_STORAGE_SLOWDOWN for frozen weights loaded in `frozen_dtype` (models.base_dtype), quantized to
    `quant_bits`, in a step that runs under bf16/fp16 autocast; 1 for weights in the compute dtype."""
    if quant_bits:
        return CPU_STORAGE_SLOWDOWN["quantized"]
    return CPU_STORAGE_SLOWDOWN["frozen float32"] if autocast and frozen_dtype == "float32" else 1.0


def cpu_bandwidth() -> float:
    """Bytes/s decoding reads this CPU's memory at: CPU_BANDWIDTH_GBS_PER_CORE per torch thread (one per core)."""
    import torch

    return CPU_BANDWIDTH_GBS_PER_CORE * 1e9 * torch.get_num_threads()


def generation_seconds(gen, arch: dict, prompt_tokens: float, weight_bytes: float, peak: float, mfu: float,
                       bandwidth: float, layer_seconds: float) -> float:
    """Seconds a method spends sampling per optimizer step: `gen` (methods.contract.Generation) over prompts of
    `prompt_tokens` on average, with `weight_bytes` of weights (gen.weight_bytes where the method samples from other
    weights), at `peak` FLOP/s (prefill at `mfu` of it), `bandwidth` bytes/s and `layer_seconds` per layer and step."""
    layers, n = arch["layers"], arch["params"]
    attn_per_token = 4 * layers * arch["heads"] * arch["head_dim"]  # QK^T and AV FLOPs per token of context
    prefill = gen.batch * prompt_tokens * (2 * n + attn_per_token * prompt_tokens / 2) / (peak * mfu)
    context = prompt_tokens + gen.new_tokens / 2  # the mean context a decoding step attends over
    kv = gen.batch * context * layers * 2 * arch["kv_heads"] * arch["head_dim"] * gen.kv_bytes
    step = (max((weight_bytes + kv) / bandwidth, layers * layer_seconds)
            + gen.batch * (2 * n + attn_per_token * context) / peak)
    return gen.sequences / gen.batch * (prefill + gen.new_tokens * step)
