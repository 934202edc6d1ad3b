#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md section 2 (finetuning tokens/s and MFU, ours against HF and TRL) in one
# command, on a machine with one GPU, torch and transformers, and no network (nothing JIT-built, no Ray).
#
#   bash bench/gpu_finetune_throughput.sh --fetch   # here, with the package registry: the wheels that machine lacks
#   bash bench/gpu_finetune_throughput.sh           # there (carry bench/wheels): 0.5B and 1.5B, ours beside HF and TRL
#
# Each size: the same DSPy-shaped records for every engine (prompts 100-400 tokens, answers 5-60), bf16,
# sequence 1,024, micro batch 8; at 1.5B ours also with compile_layers (torch.compile of each decoder layer).
# The JSON lines go to $OUT (the device tool brings them back); each size ends with its ratio line.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch" ]; then
    mkdir -p bench/wheels
    # DeepSpeed is an sdist: built here against this torch, its ops left to JIT (none is used on that path)
    DS_BUILD_OPS=0 python -m pip wheel --no-deps --no-build-isolation -q -w bench/wheels deepspeed==0.19.8
    python -m pip download --no-deps -q -d bench/wheels trl==1.16.0 datasets==5.2.0
    ls -la bench/wheels
    exit 0
fi
python -m pip install --no-deps --no-index -q bench/wheels/*.whl
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python bench/finetune.py --size 0.5b --bf16 --steps 20 --engines ours hf-group hf-packed trl \
    --out "$OUT/gpu-finetune-05b.jsonl" 2>&1 | tail -n 4
python bench/finetune.py --size 1.5b --bf16 --steps 12 --engines ours ours-compile hf-group trl \
    --out "$OUT/gpu-finetune-15b.jsonl" 2>&1 | tail -n 4
