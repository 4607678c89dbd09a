#!/usr/bin/env bash
# The Fashion-MNIST comparison on one GPU, in one call: every run of benchmarks/fashion_mnist.sh (11 recipes x seeds
# 0, 1, 2, the preset's defaults) that the archive lacks is trained, evaluated with the page's two evaluations and
# archived, JOBS processes at a time sharing the GPU; seed 0 of every recipe first, then seeds 1 and 2. No run starts
# after DEADLINE seconds, so the call ends inside the device's 10-minute limit with every started run whole; the
# next call takes the rest. The new records come back as $OUT/fashion-mnist-runs.tar.gz (unpack it in the repository
# root, then `bash benchmarks/fashion_mnist.sh page`). Each record says which device trained and evaluated it.
#
# Carried with the call (ignored paths): data/fashion-mnist (the four IDX files: cp /usr/share/datasets/fashion-mnist/*
# data/fashion-mnist/) and, where the device image lacks a package robustmix imports, .whl (see the device notes).
#     bash benchmarks/fashion_mnist_gpu.sh
# A dry run of the plumbing on a CPU (a few minutes):
#     RECIPES=pgd_at SEEDS=0 EXTRA="--max-steps 2" N_EXAMPLES=8 ATTACKS=pgd20 FULL_SPLIT=0 ARCHIVE=/tmp/archive \
#         RUNS=/tmp/runs OUT=/tmp/out bash benchmarks/fashion_mnist_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/out} DATA=${DATA:-data/fashion-mnist} ARCHIVE=${ARCHIVE:-benchmarks/runs/fashion-mnist}
export RUNS=${RUNS:-runs/fashion-mnist} EXTRA=${EXTRA:-} N_EXAMPLES=${N_EXAMPLES:-2000} FULL_SPLIT=${FULL_SPLIT:-1}
export ATTACKS=${ATTACKS:-pgd20 cw apgd-ce apgd-t square} DEADLINE=${DEADLINE:-480}
export START=$(date +%s) PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
read -r -a recipes <<< "${RECIPES:-pgd_at fgsm_rs trades mart mail awp gairat sglr caat bilaw adalab}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
mkdir -p "$OUT" "$RUNS" "$ARCHIVE"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'

# one RECIPE SEED: train, evaluate (the suite on the first N_EXAMPLES test images; PGD-20 on all of them), archive.
one() {
    local recipe=$1 seed=$2 name=$1-seed$2 run
    run=$RUNS/$name
    if (( $(date +%s) - START > DEADLINE )); then echo "$name: not started (deadline)"; return 0; fi
    # shellcheck disable=SC2086  # EXTRA and ATTACKS are word lists
    python3 "recipes/$recipe.py" --preset fashion-mnist --seed "$seed" --data-path "$DATA" --output-dir "$run" \
        --data-on-device --overwrite $EXTRA > "$RUNS/$name.log" 2>&1 || { echo "$name: training failed"; return 0; }
    # shellcheck disable=SC2086
    python3 recipes/evaluate.py --run-dir "$run" --n-examples "$N_EXAMPLES" --attacks $ATTACKS --no-sweep \
        --no-progress > "$run/eval.log" 2>&1 || { echo "$name: evaluation failed"; return 0; }
    if [[ $FULL_SPLIT == 1 ]]; then
        python3 recipes/evaluate.py --run-dir "$run" --attacks pgd20 --no-sweep --output "$run/eval_full_split.json" \
            --no-progress > "$run/eval_full_split.log" 2>&1 || { echo "$name: full-split evaluation failed"; return 0; }
    fi
    mkdir -p "$ARCHIVE/$name"
    find "$run" -maxdepth 1 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' \
        -o -name '*.txt' \) -exec cp {} "$ARCHIVE/$name/" \;
    echo "$name: done after $(( $(date +%s) - START )) s"
}
export -f one

todo=()
for seed in "${seeds[@]}"; do for recipe in "${recipes[@]}"; do
    [[ -f $ARCHIVE/$recipe-seed$seed/eval.json ]] || todo+=("$recipe" "$seed")
done; done
echo "$(( ${#todo[@]} / 2 )) runs to do, ${JOBS:=12} at a time"
printf '%s\n' "${todo[@]}" | xargs -n 2 -P "$JOBS" bash -c 'one "$@"' _

new=$(find "$ARCHIVE" -mindepth 1 -maxdepth 1 -type d -newermt "@$START" -printf '%P\n')
if [[ -n $new ]]; then
    # shellcheck disable=SC2046  # one folder name per word
    tar czf "$OUT/fashion-mnist-runs.tar.gz" -C "$(dirname "$ARCHIVE")" \
        $(for name in $new; do echo "$(basename "$ARCHIVE")/$name"; done)
    echo "archived: $new"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
