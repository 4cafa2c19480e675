#!/bin/bash
# Every GPU figure in benchmarks/RESULTS.md in one go: LoRA and QLoRA SFT against plain TRL+PEFT on a
# Llama-3.2-1B-shaped model (random bf16 weights), then GRPO generation. Needs tunelab with its [gpu] extra on a CUDA
# machine. Logs and JSON go to $OUT (default benchmarks/out).
#
#   bash benchmarks/gpu_suite.sh
#   TOKENIZER=/path/to/tokenizer_dir bash benchmarks/gpu_suite.sh     # where the embedded model is not installed
#   CONFIG=/tmp/tiny.json STEPS=2 BATCH=2 NEW_TOKENS=4 bash benchmarks/gpu_suite.sh   # a quick check of the script
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
CONFIG=${CONFIG:-benchmarks/models/llama-3.2-1b.json}
TOKENIZER=${TOKENIZER:-embedded:smollm2-135m-instruct}
STEPS=${STEPS:-40} BATCH=${BATCH:-16} NEW_TOKENS=${NEW_TOKENS:-128}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"

# the model once, for all three benchmarks
MODEL=$(python -c "import sys; from pathlib import Path; from sft_throughput import model_from_config as m; \
print(m(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))" "$CONFIG" "$WORK" "$TOKENIZER" | tail -n 1)
COMMON=(--model "$MODEL" --steps "$STEPS" --batch-size "$BATCH" --max-length 1024 --repeats 2 --dropouts 0 --heldout 16)
LIGER=()
python -c "import liger_kernel, torch; assert torch.cuda.is_available()" 2>/dev/null \
    && LIGER=(--tunelab method.use_liger_kernel=true)

python benchmarks/sft_throughput.py "${COMMON[@]}" --tunelab "${LIGER[@]}" --json "$OUT/lora.json" 2>&1 \
    | tee "$OUT/lora.log" | grep -E '^(#|trl|tunelab|same)'
python benchmarks/sft_throughput.py "${COMMON[@]}" --qlora --tunelab \
    ${LIGER:+"${LIGER[@]}" training.gradient_checkpointing=true} --json "$OUT/qlora.json" 2>&1 \
    | tee "$OUT/qlora.log" | grep -E '^(#|trl|tunelab|same)'
python benchmarks/grpo_generation.py --model "$MODEL" --prompts 8 --generations 8 --max-new-tokens "$NEW_TOKENS" \
    --repeats 3 2>&1 | tee "$OUT/grpo.log" | tail -n 2
