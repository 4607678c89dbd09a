#!/usr/bin/env bash
# The GPU figures benchmarks/RESULTS.md still lacks, in one call of about 6 minutes on an H100/H200:
# bf16 against fp32 with PyTorch's default TF32 convolutions and against strict IEEE fp32 (ResNet-18,
# 32x32, batch 512, PGD-AT), eager and with channels_last + torch.compile, plus each method's overhead,
# memory and host syncs in bf16. Logs and JSON go to $OUT (default benchmarks/out).
#
#     bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
run() {
    local name=$1; shift
    python3 benchmarks/throughput.py --device cuda --threads 4 --model resnet18 --channels 3 --batch-size 512 \
        --precision bf16 --warmup 3 --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run bf16_eager --methods pgd_at,trades,adalab --repeats 15
run bf16_compile --methods pgd_at --repeats 10 --channels-last --compile
