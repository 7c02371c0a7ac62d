#!/usr/bin/env bash
# Full sequential-editing evaluation: memoir / ft / grace on ZsRE (N = 10, 100, 732),
# WISE hallucination (600) and WISE temporal (75).  Writes one JSON per run under
# benchmarks/results/eval/ and a plot per dataset.  Long: run it on a dedicated machine.
#
# Environment knobs (defaults in brackets):
#   MODEL [smollm2]            model alias / local HF folder / .gguf
#   DATA_DIR [../shared/data]  benchmark data
#   OUT [benchmarks/results/eval]
#   METHODS ["memoir ft grace"]
#   ONLY ["zsre hallucination temporal"]   subset of datasets
#   CONFIG_ARGS                 MemoirConfig source for every run, e.g. "--config my.yaml";
#                               default "--preset smollm2" when memoir/presets/smollm2.yaml exists
#   HALLU_ARGS ["--threshold 0.9"]  extra args for hallucination (MEMOIR README: tau = 0.9)
#   TEMPORAL_ARGS [""]          extra args for temporal (tau for Temporal is not published)
#   ZSRE_EVAL_EVERY [100]       forgetting-curve interval for the N=732 ZsRE run (0 = off)
#   N_OVERRIDE                  force every N to this value (smoke test), e.g. N_OVERRIDE=2
#   N_ITER                      force the steps per edit (all methods), e.g. N_ITER=2
#   THREADS                     torch CPU threads
#   EXTRA_ARGS                  appended to every run (e.g. "--device cuda", "--no-em")
#   SKIP_EXISTING [1]           do not redo runs whose JSON exists
#   MEMOIR_NAME [memoir-relgate]  run name of MEMOIR outputs (<data>_<name>_n<N>.json); the
#                               current smollm2 preset's runs are called memoir-relgate
#   CHECKPOINT_EVERY [10]       snapshot every K edits into <output>.partial/; a run whose
#                               snapshot exists is resumed (--resume), so re-running the script
#                               after an interruption loses at most K edits
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-smollm2}
DATA_DIR=${DATA_DIR:-../shared/data}
OUT=${OUT:-benchmarks/results/eval}
METHODS=${METHODS:-"memoir ft grace"}
ONLY=${ONLY:-"zsre hallucination temporal"}
HALLU_ARGS=${HALLU_ARGS:-"--threshold 0.9"}
TEMPORAL_ARGS=${TEMPORAL_ARGS:-}
ZSRE_EVAL_EVERY=${ZSRE_EVAL_EVERY:-100}
SKIP_EXISTING=${SKIP_EXISTING:-1}
EXTRA_ARGS=${EXTRA_ARGS:-}
MEMOIR_NAME=${MEMOIR_NAME:-memoir-relgate}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-10}
if [[ -z "${CONFIG_ARGS+x}" ]]; then
  if [[ -f memoir/presets/smollm2.yaml ]]; then CONFIG_ARGS="--preset smollm2"; else CONFIG_ARGS=""; fi
fi
[[ -n "${N_ITER:-}" ]] && EXTRA_ARGS="$EXTRA_ARGS --n-iter $N_ITER"
[[ -n "${THREADS:-}" ]] && EXTRA_ARGS="$EXTRA_ARGS --threads $THREADS"

ZSRE="$DATA_DIR/zsre/zsre_mend_eval_portability_gpt4.public.json"
HALLU="$DATA_DIR/wise/hallucination/hallucination-edit.json"
TEMPORAL="$DATA_DIR/wise/temporal/temporal-edit.json"
mkdir -p "$OUT"

run() {  # run NAME DATA FORMAT N METHOD [extra args...]
  local name=$1 data=$2 fmt=$3 n=$4 method=$5; shift 5
  [[ -n "${N_OVERRIDE:-}" ]] && n=$N_OVERRIDE
  local label=$method
  [[ $method == memoir ]] && label=$MEMOIR_NAME
  local out="$OUT/${name}_${label}_n${n}.json"
  if [[ "$SKIP_EXISTING" == 1 && -f "$out" ]]; then echo "skip $out (exists)"; return; fi
  local resume=""
  [[ -d "$out.partial" ]] && resume="--resume"
  echo "=== $name N=$n $method -> $out ${resume:+(resuming)}"
  # shellcheck disable=SC2086
  $PYTHON -m memoir.eval.cli_eval eval --model "$MODEL" --data "$data" --format "$fmt" --n "$n" \
    --method "$method" $CONFIG_ARGS "$@" $EXTRA_ARGS --checkpoint-every "$CHECKPOINT_EVERY" $resume \
    --output "$out" 2>&1 | tee -a "${out%.json}.log"
}

for method in $METHODS; do
  if [[ " $ONLY " == *" zsre "* ]]; then
    run zsre "$ZSRE" zsre 10 "$method"
    run zsre "$ZSRE" zsre 100 "$method"
    if [[ "$ZSRE_EVAL_EVERY" -gt 0 ]]; then
      run zsre "$ZSRE" zsre 732 "$method" --eval-every "$ZSRE_EVAL_EVERY"
    else
      run zsre "$ZSRE" zsre 732 "$method"
    fi
  fi
  if [[ " $ONLY " == *" hallucination "* ]]; then
    # shellcheck disable=SC2086
    run hallucination "$HALLU" hallucination 600 "$method" $([[ $method == memoir ]] && echo $HALLU_ARGS)
  fi
  if [[ " $ONLY " == *" temporal "* ]]; then
    # shellcheck disable=SC2086
    run temporal "$TEMPORAL" temporal 75 "$method" $([[ $method == memoir ]] && echo $TEMPORAL_ARGS)
  fi
done

for name in $ONLY; do
  files=("$OUT"/"${name}"_*.json)
  if [[ -e "${files[0]}" ]]; then
    $PYTHON -m memoir.eval.cli_eval plot "${files[@]}" --output "$OUT/${name}.png" || true
  fi
done
echo "results in $OUT"
