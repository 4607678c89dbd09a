#!/usr/bin/env bash
# ADA-Lab's readings on the fashion-mnist preset, for selection on the validation split.
# Resumable: finished runs are skipped, interrupted ones continue (recipes/compare.py). Two queues, one core each.
#   bash benchmarks/fashion_mnist_adalab.sh [SEED]     # the screening: every reading on one seed (default 0)
#   bash benchmarks/fashion_mnist_adalab.sh finalists  # PGD-AT, the default and the two runners-up on seeds 1, 2
#   bash benchmarks/fashion_mnist_adalab.sh test       # the four finalists x seeds 0-2 on the test split: the
#       benchmark's suite (fashion_mnist.sh) on the first 2,000 test images, archived, and the page
#       docs/results_fashion_mnist_adalab_test.md (+ .json) with the paired differences to PGD-AT
# The screening ran every reading on the first reading's other settings, its weight curve included
# (--weighting adalab, the default then), so each reading below names it; the folder names are the archive's.
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-0}
first=(--weighting adalab)
recover=(--aa-until-recovered --aa-steps 5 --aa-step-size 0.025)
run() {  # run SUFFIX FLAGS...: adalab with FLAGS as runs/fashion-mnist/adalab-SUFFIX-seedS
    local suffix=$1; shift
    python recipes/compare.py --preset fashion-mnist --recipes adalab --seeds "${seeds[@]}" --jobs 1 \
        --variant "$suffix" --archive benchmarks/runs/fashion-mnist -- "$@"
}
defaults() {  # PGD-AT and ADA-Lab's defaults (MAIL-shaped weights) as runs/fashion-mnist/{pgd_at,adalab}-seedS
    python recipes/compare.py --preset fashion-mnist --recipes pgd_at adalab --seeds "${seeds[@]}" --jobs 1 \
        --archive benchmarks/runs/fashion-mnist
}
queue_a() {  # in order of priority: an interrupted session leaves the most informative runs done
    defaults
    run recover "${first[@]}" "${recover[@]}"
    run keep-true "${first[@]}" --target keep-true
    run source-adv "${first[@]}" --target-source adv
    run trades "${first[@]}" --base trades
    run margin-recovery "${first[@]}" "${recover[@]}" --margin aa-steps
}
queue_b() {
    run weights-adalab "${first[@]}"
    run floor "${first[@]}" --target floor
    run direction "${first[@]}" --target direction
    run weights-none --weighting none
    run source-clean "${first[@]}" --target-source clean
    run recover-noproj "${first[@]}" "${recover[@]}" --no-aa-project
    run margin-clean "${first[@]}" --margin-at clean
}
if [[ $seed == test ]]; then
    finalists=(pgd_at adalab adalab-weights-adalab adalab-keep-true)
    suite=(--n-examples 2000 --attacks pgd20 cw apgd-ce apgd-t square --no-sweep)
    runs=()
    for name in "${finalists[@]}"; do for s in 0 1 2; do
        run=runs/fashion-mnist/$name-seed$s archived=benchmarks/runs/fashion-mnist/$name-seed$s
        if [[ ! -f $archived/eval.json ]]; then  # two at a time, one thread each
            while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
            OMP_NUM_THREADS=1 python recipes/evaluate.py --run-dir "$run" "${suite[@]}" --no-progress \
                > "$run/eval.log" 2>&1 && cp "$run"/eval.{json,md} "$archived/" &
        fi
        runs+=("$archived")
    done; done
    wait
    python recipes/results.py "${runs[@]}" "${suite[@]}" --stored --output docs/results_fashion_mnist_adalab_test.md \
        --title "ADA-Lab's finalists against PGD-AT on Fashion-MNIST: test split"
    exit
fi
if [[ $seed == finalists ]]; then
    seeds=(1 2)
    defaults > runs/fashion_mnist_adalab_a.log 2>&1 &
    { run weights-adalab "${first[@]}"; run keep-true "${first[@]}" --target keep-true; } \
        > runs/fashion_mnist_adalab_b.log 2>&1 &
else
    seeds=("$seed")
    queue_a > runs/fashion_mnist_adalab_a.log 2>&1 &
    queue_b > runs/fashion_mnist_adalab_b.log 2>&1 &
fi
wait
