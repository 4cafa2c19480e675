"""The step-time half of `tunelab estimate`: the throughput a step's FLOPs run at.

A GPU's peak is its data sheet's (estimate.DEVICES). A CPU has no such figure, and the one a run gets depends on the
machine and on what else runs there (the 2-core machine the CPU figures come from ran a 2048 x 2048 bf16 matmul at
0.7-2.0 TFLOP/s over one day), so an estimate for the CPU this process runs on measures it: a short matmul probe in
the dtype the run's matmuls compute in, once per process.
"""

from __future__ import annotations

import time
from functools import lru_cache

# The probe: square operands of the size the CPU figures were measured at, a few warm-up products (thread pool,
# oneDNN/AMX kernel selection), then as many products as fit in PROBE_SECONDS.
PROBE_SIZE = 2048
PROBE_WARMUP = 2
PROBE_SECONDS = 0.3


@lru_cache(maxsize=None)
def cpu_matmul_flops(dtype: str) -> tuple[float, str]:
    """(FLOP/s, dtype measured) of a PROBE_SIZE square matmul on this CPU in `dtype` (bfloat16, float16, float32),
    with this process' torch threads. A dtype whose matmul this torch build cannot run on CPU falls back to float32.
    Cached: the probe runs once per process and dtype."""
    import torch

    n = PROBE_SIZE
    for name in (dtype, "float32"):
        try:
            a = torch.randn(n, n, dtype=getattr(torch, name))
            b = torch.randn(n, n, dtype=getattr(torch, name))
            for _ in range(PROBE_WARMUP):
                a @ b
        except RuntimeError:  # e.g. no CPU kernel for the half type in this build
            continue
        count, start = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= PROBE_SECONDS:
                return 2 * n**3 * count / elapsed, name
    raise RuntimeError("no float32 matmul on this CPU")  # unreachable with any working torch
