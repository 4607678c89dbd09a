#!/usr/bin/env bash
# The recipes whose defaults now follow their releases (MAIL's weights and start, FGSM-RS's wong protocol, CAAT's
# meta objective, class weights and ReMargin) and ADA-Lab's default chosen on Fashion-MNIST's validation split
# (MAIL-shaped weights) against PGD-AT on the digits preset, seeds 0, 1, 2: training, the
# evaluation suite on the test split (no eps sweep), then docs/results_digits_release_defaults.md. Resumable at every stage.
#   bash benchmarks/digits_release_defaults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
archive=benchmarks/runs/digits
recipes=(pgd_at mail fgsm_rs caat adalab)
evaluation=(--attacks pgd20 cw apgd-ce apgd-t fab-t square --no-sweep)
python recipes/compare.py --preset digits --recipes "${recipes[@]}" --seeds 0 1 2 --jobs 1 --archive "$archive"
runs=()
for recipe in "${recipes[@]}"; do for seed in 0 1 2; do runs+=("runs/digits/$recipe-seed$seed"); done; done
for run in "${runs[@]}"; do
  [[ -f $run/eval.json ]] || python recipes/evaluate.py --run-dir "$run" "${evaluation[@]}" --no-progress \
      > "$run/eval.log" 2>&1
done
python recipes/results.py "${runs[@]}" "${evaluation[@]}" --output docs/results_digits_release_defaults.md \
    --title "Results: the release defaults on digits"
python recipes/compare.py --preset digits --recipes "${recipes[@]}" --seeds 0 1 2 --archive "$archive" --archive-only
