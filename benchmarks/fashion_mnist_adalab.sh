#!/usr/bin/env bash
# ADA-Lab's readings on the fashion-mnist preset, one seed each, for selection on the validation split.
# Resumable: finished runs are skipped, interrupted ones continue (recipes/compare.py). Two queues, one core each.
#   bash benchmarks/fashion_mnist_adalab.sh [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-0}
recover=(--aa-until-recovered --aa-steps 5 --aa-step-size 0.025)
run() {  # run SUFFIX FLAGS...: adalab with FLAGS as runs/fashion-mnist/adalab-SUFFIX-seedS
    local suffix=$1; shift
    python recipes/compare.py --preset fashion-mnist --recipes adalab --seeds "$seed" --jobs 1 \
        --variant "$suffix" --archive benchmarks/runs/fashion-mnist -- "$@"
}
queue_a() {  # in order of priority: an interrupted session leaves the most informative runs done
    python recipes/compare.py --preset fashion-mnist --recipes pgd_at adalab --seeds "$seed" --jobs 1 \
        --archive benchmarks/runs/fashion-mnist
    run recover "${recover[@]}"
    run keep-true --target keep-true
    run source-adv --target-source adv
    run trades --base trades
    run margin-recovery "${recover[@]}" --margin aa-steps
}
queue_b() {
    run weights-mail --weighting mail
    run floor --target floor
    run direction --target direction
    run weights-none --weighting none
    run source-clean --target-source clean
    run recover-noproj "${recover[@]}" --no-aa-project
    run margin-clean --margin-at clean
}
queue_a > runs/fashion_mnist_adalab_a.log 2>&1 &
queue_b > runs/fashion_mnist_adalab_b.log 2>&1 &
wait
