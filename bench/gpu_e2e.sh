#!/usr/bin/env bash
# The end-to-end benchmark (bench/e2e_bench.py) on the GPU device machine, run from the repository root:
#
#   bash bench/gpu_e2e.sh build smollm2-135m gemma3-270m   # call 1: build the CUDA extension, the small shapes
#   bash bench/gpu_e2e.sh llama2-7b                        # call 2
#   bash bench/gpu_e2e.sh llama3-8b                        # call 3
#   bash bench/gpu_e2e.sh gemma-7b                         # call 4
#   bash bench/gpu_e2e.sh                                  # every model in turn, as far as the budget goes
#
# Arguments are stages or models, in order: `build` (python setup.py build_ext --inplace, skipped when the `cuda`
# backend already loads), `profile` (torch.profiler tables of the training steps for the models after it, in
# $OUT/profiles), or a model name of bench/e2e_bench.py (llama2-7b llama3-8b gemma-7b smollm2-135m gemma3-270m,
# random weights in bf16 with SDPA). E2E_ARGS adds options to every e2e_bench run (default: 10 timed training
# steps, 6 timed decode/prefill repetitions, 2 warm-up rounds; batch 8 x 512 for training, decode at batch
# 1/8/64, prefill at 512 and 4096 tokens), e.g. E2E_ARGS="--workloads step1,step2".
#
# Each model runs in its own process under a timeout taken from what is left of E2E_BUDGET_S (default 570 s,
# inside the device tool's 600 s per call). Rows are appended to $OUT/e2e.csv as each workload finishes, so a
# model cut short keeps its finished workloads. Outputs in $OUT (default ./out/gpu_e2e): env.txt, build.log,
# e2e.csv, e2e_runs.jsonl, e2e_cuda.md, e2e_cuda_*.png, e2e_<model>.log, summary.txt (and profiles/).
#
# Afterwards, in the session (the files come back under the run tool's files_at folder, here $FILES):
#   tail -n +2 $FILES/e2e.csv >> bench/results/e2e.csv
#   cat $FILES/e2e_runs.jsonl >> bench/results/e2e_runs.jsonl
#   python bench/plot_e2e.py --device cuda        # bench/results/e2e_cuda.md and the plots
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu only to try this script without a GPU (with a small model)
BUDGET=${E2E_BUDGET_S:-570}
E2E_ARGS=${E2E_ARGS:---steps 10 --infer-steps 6 --warmup 2}
START=$(date +%s)
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(build llama2-7b llama3-8b gemma-7b smollm2-135m gemma3-270m)
PROFILE=""

left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

{
    nvidia-smi || true
    $PY -c "
import sys, torch, lofit_fast
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('lofit_fast backends:', lofit_fast.available_backends())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
"
    git rev-parse --short HEAD 2>/dev/null || true
    cat /proc/loadavg
} >"$OUT/env.txt" 2>&1

for a in "${ARGS[@]}"; do
    t=$(left)
    if [ "$t" -lt 30 ]; then
        note "$a: skipped (no time left in the ${BUDGET}s budget)"
        continue
    fi
    case "$a" in
    build)
        if $PY -c "import lofit_fast, sys; sys.exit(0 if 'cuda' in lofit_fast.available_backends() else 1)" 2>/dev/null; then
            note "build: the cuda backend already loads, not rebuilt"
            continue
        fi
        [ "$t" -gt 330 ] && t=330
        t0=$(date +%s)
        timeout --kill-after=15 "$t" $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
        note "build: exit $? after $(($(date +%s) - t0))s; backends now: $($PY -c 'import lofit_fast; print(lofit_fast.available_backends())' 2>&1 | tail -n 1)"
        ;;
    profile)
        PROFILE="--profile $OUT/profiles"
        ;;
    *)
        t0=$(date +%s)
        # SIGINT first: e2e_bench stops between steps and keeps the rows of the workloads it finished.
        # shellcheck disable=SC2086
        timeout --signal=INT --kill-after=20 "$t" $PY bench/e2e_bench.py --device "$DEVICE" --model "$a" \
            --results "$OUT" --no-report $PROFILE $E2E_ARGS >"$OUT/e2e_$a.log" 2>&1
        rc=$?
        note "$a: exit $rc after $(($(date +%s) - t0))s (limit ${t}s); $(grep -c "^  $a " "$OUT/e2e_$a.log") rows"
        [ $rc -ne 0 ] && tail -n 5 "$OUT/e2e_$a.log" | tee -a "$OUT/summary.txt"
        ;;
    esac
done

if [ -s "$OUT/e2e.csv" ]; then
    kind=$([ "$DEVICE" = cpu ] && echo cpu || echo cuda)
    $PY bench/plot_e2e.py --results "$OUT" --device "$kind" >>"$OUT/summary.txt" 2>&1
    [ -f "$OUT/e2e_$kind.md" ] && cat "$OUT/e2e_$kind.md"
fi
note "total $(($(date +%s) - START))s; files in $OUT"
