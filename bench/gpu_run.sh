#!/usr/bin/env bash
# The GPU checks of the triton backend, for the device machine (run from the repository root):
#
#   bash bench/gpu_run.sh                    # build, test, memcheck, bench, inside one 10-minute call
#   bash bench/gpu_run.sh bench              # only the named stages (build test memcheck bench)
#   BENCH_ARGS="--shapes llama2-13b,gemma-7b" bash bench/gpu_run.sh build bench
#
# Stages:
#   build     the C++/CUDA extension in place (python setup.py build_ext --inplace)
#   test      tests/test_op.py and tests/test_triton.py on the GPU (real launches, autotuning, bf16);
#             PYTEST_ARGS adds options, LOFIT_TRITON_AUTOTUNE=0 skips autotuning if compiles run too long
#   memcheck  compute-sanitizer memcheck over one launch of each Triton kernel (fixed tiles, ragged edges)
#   bench     bench/op_bench.py with BENCH_ARGS, rows streamed to $OUT/op.csv, ratio table in bench.log
#
# Everything lands in $OUT (default ./out/gpu): env.txt, build.log, pytest.log, pytest.xml, memcheck.log,
# op.csv, bench.log, summary.txt. Each stage runs under a timeout taken from what is left of
# GPU_RUN_BUDGET_S (default 570 s, inside the device tool's 600 s per call); the bench writes each row as it
# is measured, so a run cut short still returns what it measured. The full benchmark grid (4 shapes x 5 N x
# 3 K x 3 modes) with Triton's compile and autotune takes longer than one call: split it with BENCH_ARGS
# (--shapes, --n, --k, --modes, --providers), e.g. llama2-7b,smollm2 in one call and llama2-13b,gemma-7b in
# the next, then append the op.csv files to bench/results/op.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-570}
START=$(date +%s)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test memcheck bench)

left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME CAP_SECONDS COMMAND...: run under min(CAP, time left), record the exit status
stage() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 20 ]; then
        note "$name: skipped (no time left in the ${BUDGET}s budget)"
        return 0
    fi
    local t0
    t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$t" "$@"
    local rc=$?
    note "$name: exit $rc after $(($(date +%s) - t0))s (limit ${t}s)"
}

{
    nvidia-smi || true
    $PY - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
EOF
    git describe --always --dirty 2>/dev/null || true
} >"$OUT/env.txt" 2>&1

for s in "${STAGES[@]}"; do
    case "$s" in
    build)
        stage build 300 bash -c "$PY setup.py build_ext --inplace >'$OUT/build.log' 2>&1"
        ;;
    test)
        # Triton compiles every (flags, head_dim, dtype, tile) variant the tests reach: spread the tests over
        # processes when pytest-xdist is there (the compile cache is shared on disk).
        XDIST=""
        $PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"
        stage test 330 bash -c "$PY -m pytest tests/test_op.py tests/test_triton.py $XDIST -q -rs --durations=25 \
            --junitxml='$OUT/pytest.xml' ${PYTEST_ARGS:-} >'$OUT/pytest.log' 2>&1"
        tail -n 5 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
        ;;
    memcheck)
        SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
        if [ -z "$SAN" ]; then
            note "memcheck: compute-sanitizer not found"
            continue
        fi
        # No caching allocator: every tensor is its own allocation, so an out-of-bounds access cannot land
        # silently in a neighbour's memory.
        stage memcheck 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 3 \
            $PY - >"$OUT/memcheck.log" 2>&1 <<'EOF'
import math, sys
import torch
sys.path.insert(0, ".")
from lofit_fast.ops.triton_backend import import_kernels

K = import_kernels()
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1
cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)
wide = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
# Ragged on every side: 77 rows, D_out 200, head_dim 64 with 9 heads (576 columns), a strided x.
N, H, d, D = 77, 9, 64, 200
x = torch.randn(N, 2 * H * d, device=dev, dtype=torch.bfloat16)[:, ::2]
W = (torch.randn(D, H * d, device=dev) / math.sqrt(H * d)).to(torch.bfloat16)
b = torch.randn(D, device=dev, dtype=torch.bfloat16)
heads = torch.tensor([0, 4, 8], device=dev)
A = torch.randn(3, d, device=dev)
v = torch.randn(3, d, device=dev)
slot = K.head_slots(heads, H)
cols = (heads[:, None] * d + torch.arange(d, device=dev)).reshape(-1)
x_sel = x.index_select(1, cols)
dy = torch.randn(N, D, device=dev, dtype=torch.bfloat16)

y = K.head_affine_forward(x, W, b, slot, A, v, d, config=cfg)                      # fused scale + shift
folded = K.offset_bias(W, b, heads, v, d)                                          # offset fold (GEMV)
y_plain = K.head_affine_forward(x, W, folded, slot, None, None, d, config=wide)    # plain GEMM + f32 bias
dx, dA, dv = K.head_affine_backward(dy, W, heads, slot, A, x_sel, d, True, True, True, config=cfg)
_, dA_t, dv_t = K.head_affine_backward(dy, W, heads, slot, None, x_sel, d, False, True, True, config=wide)
if dev == "cuda":
    torch.cuda.synchronize()

xp = x.float().clone()
xp[:, cols] = xp[:, cols] * (1 + A.reshape(-1)) + v.reshape(-1)
ref_y = xp @ W.float().T + b.float()
g = dy.float() @ W.float()
checks = {
    "y": (y.float(), ref_y),
    "y_folded": (y_plain.float(), (x.float() @ W.float().T + folded)),
    "dA": (dA.reshape(-1), (g[:, cols] * x_sel.float()).sum(0)),
    "dv": (dv.reshape(-1), g[:, cols].sum(0)),
    "dA_thin": (dA_t.reshape(-1), (g[:, cols] * x_sel.float()).sum(0)),
    "dv_thin": (dv_t.reshape(-1), g[:, cols].sum(0)),
}
bad = 0
for name, (got, ref) in checks.items():
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"{name}: rel err {err:.2e}")
    bad += not err < 5e-2
print("memcheck driver:", "FAILED" if bad else "ok")
sys.exit(1 if bad else 0)
EOF
        grep -E "ERROR SUMMARY|rel err|memcheck driver" "$OUT/memcheck.log" | tee -a "$OUT/summary.txt"
        ;;
    bench)
        # shellcheck disable=SC2086
        stage bench 3600 bash -c "$PY bench/op_bench.py --out '$OUT/op.csv' ${BENCH_ARGS:-} >'$OUT/bench.log' 2>&1"
        ;;
    *)
        note "unknown stage '$s' (choose from build test memcheck bench)"
        ;;
    esac
done
note "total $(($(date +%s) - START))s; files in $OUT"
