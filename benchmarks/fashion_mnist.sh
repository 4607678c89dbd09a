#!/usr/bin/env bash
# The Fashion-MNIST comparison: every recipe x seeds 0, 1, 2 on the fashion-mnist preset with its defaults,
# final weights; then the results page. Resumable at every stage: rerun the same command after an interruption.
#   bash benchmarks/fashion_mnist.sh train      # 33 runs, JOBS at a time (default 2, one CPU core each)
#   bash benchmarks/fashion_mnist.sh evaluate   # every finished run: the two evaluations below, then archive
#   bash benchmarks/fashion_mnist.sh page       # docs/results_fashion_mnist.md (+ .json, scatter) from the archive,
#                                               # and docs/results_fashion_mnist_full_split.md (PGD-20, all 10,000)
#   bash benchmarks/fashion_mnist.sh status     # what each of the 33 runs has: training, the two evaluations
#                                               # (finished chunks of an interrupted suite), the archived reports
# Evaluation: clean and PGD-20 on all 10,000 test images; the per-example worst case of PGD-20, CW-inf, APGD-CE,
# APGD-T and Square on the first 2,000 test images, no eps sweep. FAB-T is left out: on PGD-AT's and ADA-Lab's
# seed 0 (first 1,000 test images, eval_test1000.json) it broke no image the other five missed, and it took about
# two thirds of the suite's time (47 minutes for 1,000 images with it; without it 31 minutes for 2,000, one core).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=benchmarks/runs/fashion-mnist
recipes=(pgd_at fgsm_rs trades mart mail awp gairat sglr caat bilaw adalab)
names=()  # the 33 run folders' names, recipe by recipe
for recipe in "${recipes[@]}"; do for seed in 0 1 2; do names+=("$recipe-seed$seed"); done; done
examples=2000  # the suite's test images; evaluate.py takes them in chunks of 256 (its default --batch-size)
suite=(--n-examples "$examples" --attacks pgd20 cw apgd-ce apgd-t square --no-sweep)
evaluation=("${suite[@]}" --full-split-attacks pgd20)
page=(--output docs/results_fashion_mnist.md --title "Results: Fashion-MNIST")
case "${1:-}" in
  train)
    python recipes/compare.py --preset fashion-mnist --recipes "${recipes[@]}" --seeds 0 1 2 --jobs "${JOBS:-2}" \
        --archive "$archive" ;;
  evaluate)
    runs=()
    for name in "${names[@]}"; do
      [[ -f runs/fashion-mnist/$name/metrics.json ]] && runs+=("runs/fashion-mnist/$name")
    done
    # JOBS runs at a time, one thread each; results.py then finds every report up to date and only writes the page.
    export OMP_NUM_THREADS=1
    # sh -c gets the run folder as $0 and the suite's flags as "$@".
    printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-2}" -I RUN sh -c '
      [ -f "$0/eval.json" ] || python recipes/evaluate.py --run-dir "$0" "$@" --no-progress > "$0/eval.log" 2>&1
      [ -f "$0/eval_full_split.json" ] || python recipes/evaluate.py --run-dir "$0" --attacks pgd20 --no-sweep \
          --output "$0/eval_full_split.json" --no-progress > "$0/eval_full_split.log" 2>&1' RUN "${suite[@]}"
    python recipes/results.py "${runs[@]}" "${evaluation[@]}" "${page[@]}"
    python recipes/compare.py --preset fashion-mnist --recipes "${recipes[@]}" --seeds 0 1 2 --archive "$archive" \
        --archive-only ;;
  page)
    # Every archived run with the suite's report; PGD-20 on the whole test split joins the table once every one
    # of them has that report too (until then the page has the suite's columns only).
    runs=() full=1
    for name in "${names[@]}"; do
      run=$archive/$name
      [[ -f $run/eval.json ]] && { runs+=("$run"); [[ -f $run/eval_full_split.json ]] || full=0; }
    done
    (( ${#runs[@]} )) || { echo "no archived run has eval.json yet" >&2; exit 1; }
    if (( full )); then
      python recipes/results.py "${runs[@]}" "${evaluation[@]}" "${page[@]}" --stored
    else
      python recipes/results.py "${runs[@]}" "${suite[@]}" "${page[@]}" --stored
    fi
    # Every archived run with PGD-20 on the whole test split, suite or not: a second page, clean and PGD-20 on all
    # 10,000 test images, that takes in each run as soon as its cheap evaluation is archived.
    whole=()
    for name in "${names[@]}"; do
      [[ -f $archive/$name/eval_full_split.json ]] && whole+=("$archive/$name")
    done
    if (( ${#whole[@]} )); then
      python recipes/results.py "${whole[@]}" --attacks pgd20 --no-sweep --report-name eval_full_split.json --stored \
          --output docs/results_fashion_mnist_full_split.md \
          --title "Results: Fashion-MNIST, clean and PGD-20 on all 10,000 test images"
    fi ;;
  status)
    # One line per run; "-" is missing. An interrupted suite shows its finished chunks of 256 examples.
    printf '%-16s %-9s %-11s %-11s %s\n' run trained suite full-split archived
    for name in "${names[@]}"; do
      run=runs/fashion-mnist/$name trained=- suite=- full=- archived=
      [[ -f $run/metrics.json ]] && trained=yes
      if [[ -f $run/eval.json ]]; then suite=yes
      elif [[ -d $run/eval_chunks ]]; then suite="$(find "$run/eval_chunks" -name 'chunk_*.json' | wc -l)/$(( (examples + 255) / 256 )) chunks"
      fi
      [[ -f $run/eval_full_split.json ]] && full=yes
      for report in config.json eval.json eval_full_split.json; do
        [[ -f $archive/$name/$report ]] && archived+="$report "
      done
      archived=${archived% }
      printf '%-16s %-9s %-11s %-11s %s\n' "$name" "$trained" "$suite" "$full" "${archived:--}"
    done ;;
  *) echo "usage: bash benchmarks/fashion_mnist.sh train|evaluate|page|status" >&2; exit 2 ;;
esac
