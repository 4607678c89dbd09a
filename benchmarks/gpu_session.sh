#!/usr/bin/env bash
# The GPU figures benchmarks/RESULTS.md still lacks (issue 22 first), in one call of under 10 minutes on an H100:
#   1. resnet18_bf16: ResNet-18 (CIFAR stem), 32x32x3, batch 512, bf16, PGD-10 AT: the hand-written eager loop,
#      robustmix eager and robustmix's fast path side by side (images/s, speed-up over the hand-written loop, peak
#      memory, TFLOP/s and the fraction of the dense bf16 peak), host syncs, and bf16 against fp32 with and without
#      TF32. If it fails (other than by its time limit), resnet18_bf16_eager measures the same without the fast path.
#   2. digits_b128: the digits model (launch-bound), batch 128, bf16: robustmix eager against the fast path.
#   3. equivalence: 100 PGD-AT training steps on the digits from the same seed, eager twice and fast, bf16; the
#      loss and validation accuracies, with the tolerance fast_equivalence.py states.
#   4. short_batch: which passes through a model compiled in place (channels_last, bf16) fail on CUDA: the eager
#      attack as it was and as it is, the compiled iteration at a short batch, the training pass (gpu_short_batch.py).
#   5. recipe_fast: a recipe end to end with --fast (digits, bf16, 2 epochs: short last batches and validation).
# Every part has its own time limit; a part that fails or runs out of time is reported and the next one runs.
# Logs (.txt) and figures (.json) go to $OUT (default benchmarks/out); the end prints what was measured.
#
#     bash benchmarks/gpu_session.sh                  # on a machine with a CUDA GPU
#     bash benchmarks/gpu_session.sh --device cpu     # dry run: every part at toy size on the CPU (aot_eager)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device takes cuda or cpu}; fi
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee "$OUT/environment.txt"
if [ "$DEVICE" = cuda ]; then
    python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' \
        | tee -a "$OUT/environment.txt" || exit 1
    nvidia-smi >> "$OUT/environment.txt" 2>&1
    # name, time limit (s), command
    RESNET=(--device cuda --threads 4 --model resnet18 --channels 3 --batch-size 512 --precision bf16
            --methods pgd_at --repeats 10 --warmup 2)
    DIGITS=(--device cuda --threads 4 --batch-size 128 --precision bf16 --methods pgd_at --repeats 20 --warmup 2)
    EQUIVALENCE=(--device cuda --threads 4 --precision bf16 --steps 100 --backend inductor)
    RECIPE=(--mixed-precision bf16 --epochs 2)
    LIMITS=(150 60 80 100 150 100)  # at most 580 s: the fallback runs only after a failure that was not a timeout
    VARIANT_LIMIT=40
else  # toy sizes: the script's own paths, in seconds
    RESNET=(--device cpu --model test_resnet --batch-size 8 --attack-steps 2 --methods pgd_at --repeats 2 --warmup 1)
    DIGITS=(--device cpu --batch-size 8 --attack-steps 2 --methods pgd_at --repeats 2 --warmup 1)
    EQUIVALENCE=(--device cpu --steps 10 --batch-size 32 --backend aot_eager)
    RECIPE=(--max-steps 2 --compile aot_eager)
    LIMITS=(300 300 300 300 900 300)  # minutes on a busy 2-core machine
    VARIANT_LIMIT=200
fi
FAST=(--fast --fast-backend "$([ "$DEVICE" = cuda ] && echo inductor || echo aot_eager)")
declare -A STATUS

part() {  # part NAME LIMIT SCRIPT ARGS...: run it under a time limit, keep its log, record how it ended
    local name=$1 limit=$2 script=$3
    shift 3
    if [[ $script != recipes/* ]]; then script=benchmarks/$script; set -- "$@" --json "$OUT/$name.json"; fi
    echo "=== $name (at most $limit s): python3 $script $*"
    timeout -k 10 "$limit" python3 "$script" "$@" 2>&1 | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    STATUS[$name]=$([ "$status" = 0 ] && echo ok || { [ "$status" = 124 ] && echo "timed out" || echo "failed ($status)"; })
    return "$status"
}

part resnet18_bf16 "${LIMITS[0]}" throughput.py "${RESNET[@]}" "${FAST[@]}"
status=$?
if [ "$status" != 0 ] && [ "$status" != 124 ]; then
    part resnet18_bf16_eager "${LIMITS[1]}" throughput.py "${RESNET[@]}"
fi
part digits_b128 "${LIMITS[2]}" throughput.py "${DIGITS[@]}" "${FAST[@]}"
part equivalence "${LIMITS[3]}" fast_equivalence.py "${EQUIVALENCE[@]}"
part short_batch "${LIMITS[4]}" gpu_short_batch.py --timeout "$VARIANT_LIMIT"
part recipe_fast "${LIMITS[5]}" recipes/pgd_at.py --preset digits --fast "${RECIPE[@]}" --output-dir /tmp/recipe_fast \
    --overwrite

echo "=== measured ($DEVICE; figures in $OUT)"
for name in "${!STATUS[@]}"; do echo "$name: ${STATUS[$name]}"; done
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("*.json")):
    result = json.loads(path.read_text())
    if "methods" in result:  # throughput.py
        for name, row in result["methods"].items():
            sides = [s for s in ("hw", "rm", "fast") if f"{s}_img_s" in row]
            speed = ", ".join(f"{s} {row[s + '_img_s']:.1f} img/s" for s in sides)
            fraction = ", ".join(f"{s} {row[s + '_peak_fraction']:.1%}" for s in sides if row.get(s + "_peak_fraction"))
            print(f"{path.stem} {name}: {speed}; x hw: rm {row['speedup_rm']:.2f}"
                  + (f", fast {row['speedup_fast']:.2f} (fast / rm eager {row['speedup_fast_over_rm']:.2f})"
                     if "fast" in sides else "")
                  + f"; {row['flops_per_image'] / 1e9:.2f} GFLOP/img" + (f"; of peak: {fraction}" if fraction else ""))
        for target in result["targets"]:
            if target["verdict"] != "PASS" or "fast" in target["target"]:
                print(f"  {target['verdict']:<5} {target['target']}: {target['measured']}")
    elif "variants" in result:  # gpu_short_batch.py
        for line in result["variants"].values():
            print(f"{path.stem}: {line}")
    elif "within" in result:  # fast_equivalence.py
        print(f"{path.stem}: fast - eager {result['fast_vs_eager']}; A/A {result['eager_vs_eager']}; "
              f"tolerance {result['limits']}; {'PASS' if result['within'] else 'FAIL'}")
EOF
