#!/usr/bin/env bash
# The whole GPU picture in one call of the device machine (issue #11), from the repository root:
#
#   bash bench/gpu_check.sh              # on the GPU: at most GPU_CHECK_BUDGET_S (480) s of wall time, build included
#   bash bench/gpu_check.sh --dry-run    # every stage on the CPU: tiny shapes, Triton under TRITON_INTERPRET=1
#   COMMIT=<sha> bash bench/gpu_check.sh # where the copy of the tree is not a git checkout (the device machine)
#
# Stages, each under its own `timeout`: a cap (build 200 s, tests 150, memcheck 60 + 120, op 110, decode 40, e2e 170 on
# the GPU), cut to what is left of the budget so that every later stage keeps its minimum (tests 60, memcheck 20,
# op 40, decode 15, e2e 90) and 30 s stay for the end; the whole script under `timeout $GPU_CHECK_BUDGET_S`:
#   probe     nvidia-smi and the versions -> env.json; no CUDA device or a torch without CUDA stops everything
#   build     TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) python setup.py build_ext --inplace, then a fresh process
#             must load the cuda backend; a failed build skips the cuda tests, the cuda memcheck and the cuda timings
#   tests     tests/test_triton.py and tests/test_cuda.py, -m "not slow", -x (per-test timeout with pytest-timeout
#             when it is installed, else the stage's; faulthandler dumps a test that runs past 60 s) -> tests.log
#   memcheck  compute-sanitizer memcheck of lofit_fast.head_affine_linear forward + backward on small ragged shapes
#             (backend triton and cuda), after a probe that compute-sanitizer works here at all
#   op        bench/op_bench.py --preset gpu-check: Llama-2-7B o_proj (C = D_out = 4096, d = 128, bf16),
#             N in 1, 8, 4096, 16384; v on 4 heads, A and v on 4 heads, A on all 32; fwd and fwd+bwd; F.linear,
#             cuda, triton, the dense hook, the official per-head loop -> op.csv
#   decode    bench/decode_bandwidth.py at N = 1 and 8 against a plain copy -> decode.csv
#   e2e       bench/e2e_bench.py, random-weight Llama-2-7B built once: step1, step2 (floor, fused-cuda,
#             fused-triton, hooks, hooks_loop, lora) and decode (base, fused-cuda, fused-triton, hooks, merged),
#             peak memory for each -> e2e.csv
#   dispatch  the cuda/triton choice of `auto` per shape, from op.csv -> dispatch.json
#   summary   bench/gpu_summary.py: every goal of issue #11 section 3, met or not, with its figure -> summary.md
#
# Output in $OUT (default ./out/gpu_check), at most 8 files: op.csv, decode.csv, e2e.csv, dispatch.json, summary.md,
# env.json, tests.log and logs.tar.gz (every stage's log, stages.tsv, the e2e run record). Files of an earlier run
# with these names are replaced. Exit status 0 when every stage that ran passed (skipped ones are listed in
# summary.md), 1 when a stage failed or timed out, 2 when the probe stopped everything.
#
# Environment: OUT, COMMIT, PYTHON (default python), GPU_CHECK_BUDGET_S (480), GPU_CHECK_CAP_<STAGE> (seconds, e.g.
# GPU_CHECK_CAP_E2E=200), TORCH_CUDA_ARCH_LIST (9.0), GPU_CHECK_KEEP_WORK=1 (keep the work folder).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
for arg in "$@"; do
    case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "gpu_check: unknown argument '$arg' (use --dry-run or --help)" >&2
        exit 2
        ;;
    esac
done

BUDGET=${GPU_CHECK_BUDGET_S:-480}
# The whole script under one overall timeout: re-run this file under `timeout`, once.
if [ -z "${GPU_CHECK_INNER:-}" ]; then
    export GPU_CHECK_INNER=1
    GPU_CHECK_T0=$(date +%s)
    export GPU_CHECK_T0
    timeout --signal=TERM --kill-after=10 "$BUDGET" bash "$0" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check: the overall ${BUDGET} s timeout stopped the run (exit $rc); whatever was written is in ${OUT:-$ROOT/out/gpu_check}"
    fi
    exit "$rc"
fi

T0=${GPU_CHECK_T0:-$(date +%s)}
FINAL_RESERVE=30 # seconds kept for the dispatch table, the summary and the tar at the end
DEADLINE=$((T0 + BUDGET - FINAL_RESERVE))
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
FILES=(op.csv decode.csv e2e.csv dispatch.json summary.md env.json tests.log logs.tar.gz)
for f in "${FILES[@]}"; do rm -f "$OUT/$f"; done
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" -eq 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    MODE="dry run (CPU, TRITON_INTERPRET=1)"
    CMD="bash bench/gpu_check.sh --dry-run"
else
    unset TRITON_INTERPRET # real kernels (tests/conftest.py sets the interpreter only where torch sees no GPU)
    MODE="GPU"
    CMD="bash bench/gpu_check.sh"
fi
FAILED=0
BUILD_OK=0

say() { echo "[gpu_check $(($(date +%s) - T0))s] $*" | tee -a "$WORK/gpu_check.log"; }
left() { echo $((DEADLINE - $(date +%s))); }
# record NAME STATUS SECONDS NOTE: one line of stages.tsv (read by gpu_summary.py) and of the console
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/stages.tsv"
    say "$1: $2 (${3} s)${4:+ - $4}"
    case "$2" in failed* | "timed out"* | "skipped: no time"*) FAILED=1 ;; esac
}
# run NAME CAP RESERVE LOG COMMAND...: COMMAND under timeout min(CAP, time left - RESERVE), output to LOG.
# Sets RC (124 on a timeout, 200 when there was no time left to start it), SECS and LIMIT. GPU_CHECK_CAP_<NAME> overrides CAP.
run() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local var
    var="GPU_CHECK_CAP_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    cap=${!var:-$cap}
    local t=$(($(left) - reserve))
    [ "$t" -gt "$cap" ] && t=$cap
    SECS=0
    LIMIT=$t
    if [ "$t" -lt 10 ]; then
        RC=200
        return
    fi
    local s
    s=$(date +%s)
    timeout --signal="${SIGNAL:-TERM}" --kill-after=15 "$t" "$@" >"$log" 2>&1
    RC=$?
    SECS=$(($(date +%s) - s))
}
# status_of RC: the stage status for an exit code
status_of() {
    case "$1" in
    0) echo ok ;;
    124 | 137) echo "timed out (limit ${LIMIT:-?} s)" ;;
    200) echo "skipped: no time left in the ${BUDGET} s budget" ;;
    *) echo "failed (exit $1)" ;;
    esac
}
last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300; }

finish() {
    # dispatch table and summary, then the tar; always runs, also after the probe stopped everything
    local s
    if [ -s "$OUT/op.csv" ]; then
        s=$(date +%s)
        timeout 20 "$PY" -m lofit_fast.ops.dispatch --from-op-csv "$OUT/op.csv" --out "$OUT/dispatch.json" \
            >"$WORK/dispatch.log" 2>&1
        local rc=$?
        record dispatch "$(status_of $rc)" $(($(date +%s) - s)) "$(last_line "$WORK/dispatch.log")"
    else
        record dispatch skipped 0 "no op.csv: nothing to derive the table from"
    fi
    local dry_args=()
    [ "$DRY" -eq 1 ] && dry_args=(--dry --shape 256,96,32 --model tiny)
    s=$(date +%s)
    timeout 20 "$PY" bench/gpu_summary.py --dir "$OUT" --stages "$WORK/stages.tsv" --command "$CMD" \
        --elapsed $(($(date +%s) - T0)) "${dry_args[@]}" >"$WORK/summary.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED=1
        { echo "# GPU check summary"; echo; echo "bench/gpu_summary.py failed (exit $rc):"; echo '```';
          tail -n 20 "$WORK/summary.log"; echo '```'; echo; echo "Stages:"; echo '```'; cat "$WORK/stages.tsv";
          echo '```'; } >"$OUT/summary.md"
    fi
    cat "$WORK/summary.log"
    say "summary: $(status_of $rc) ($(($(date +%s) - s)) s)"
    cp "$WORK/stages.tsv" "$WORK/logs/" 2>/dev/null
    cp "$WORK/gpu_check.log" "$WORK/logs/" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null || say "could not write logs.tar.gz"
    local extra
    extra=$(ls -A "$OUT" | grep -v -x -F -f <(printf '%s\n' "${FILES[@]}") || true)
    [ -n "$extra" ] && say "note: $OUT also holds files of something else: $extra"
    say "total $(($(date +%s) - T0)) s ($MODE); in $OUT: $(cd "$OUT" && ls "${FILES[@]}" 2>/dev/null | tr '\n' ' ')"
    [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] && say "work folder kept: $WORK" || rm -rf "$WORK"
}

mkdir -p "$WORK/logs"
: >"$WORK/stages.tsv"
say "mode: $MODE; budget ${BUDGET} s; out $OUT"

# ------------------------------------------------------------------------------------------------ 0. probe
COMMIT_ID=${COMMIT:-}
if [ -z "$COMMIT_ID" ] && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    COMMIT_ID=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)
    [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -n 1)" ] && COMMIT_ID="$COMMIT_ID-dirty"
fi
COMMIT_ID=${COMMIT_ID:-unknown (not a git checkout and no COMMIT given)}
export COMMIT="$COMMIT_ID"
{ timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not available (exit $?)"; } >"$WORK/logs/nvidia-smi.txt"
s=$(date +%s)
timeout 60 "$PY" - "$WORK/logs/nvidia-smi.txt" "$OUT/env.json" "$DRY" "$BUDGET" >"$WORK/logs/probe.log" 2>&1 <<'EOF'
import json, os, platform, shutil, subprocess, sys, time

smi_path, out, dry, budget = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
env = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "dry-run" if dry else "gpu", "budget_s": budget,
       "commit": os.environ.get("COMMIT", "unknown"), "python": platform.python_version(), "host_cpus": os.cpu_count(),
       "nvidia_smi": open(smi_path).read().strip()}
fatal = None
try:
    import torch
    env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    elif not dry:
        fatal = ("torch has no CUDA (a CPU build)" if torch.version.cuda is None else
                 f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})")
except Exception as exc:
    env["torch"] = f"import failed: {exc}"
    fatal = f"torch does not import: {exc}"
from importlib import metadata  # versions without importing the packages (seconds on a busy machine)
for mod in ("triton", "transformers", "peft", "pytest"):
    try:
        env[mod] = metadata.version(mod)
    except Exception as exc:
        env[mod] = f"missing ({type(exc).__name__})"
nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
if nvcc:
    try:
        env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[-1]
    except Exception as exc:
        env["nvcc"] = f"failed: {exc}"
else:
    env["nvcc"] = "not found"
try:
    env["pytest_timeout"] = metadata.version("pytest-timeout")
except Exception:
    env["pytest_timeout"] = None
if fatal:
    env["fatal"] = fatal
with open(out, "w") as f:
    json.dump(env, f, indent=1)
print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}))
if fatal:
    print(f"FATAL: {fatal}")
    sys.exit(3)
EOF
rc=$?
cp "$OUT/env.json" "$WORK/logs/" 2>/dev/null
if [ $rc -ne 0 ]; then
    why=$(grep -m1 '^FATAL:' "$WORK/logs/probe.log" | sed 's/^FATAL: //')
    why=${why:-$(last_line "$WORK/logs/probe.log")}
    echo "gpu_check: STOP: ${why} - nothing else runs" | tee -a "$WORK/gpu_check.log"
    record probe "failed (exit $rc)" $(($(date +%s) - s)) "$why; every other stage skipped"
    echo "probe stopped everything: $why" >"$OUT/tests.log"
    finish
    exit 2
fi
if [ "$DRY" -eq 1 ]; then
    record probe ok $(($(date +%s) - s)) "dry run: no CUDA by design; $("$PY" -c "import json; e = json.load(open('$OUT/env.json')); print('torch', e.get('torch'), 'triton', e.get('triton'), 'transformers', e.get('transformers'))" 2>&1)"
else
    record probe ok $(($(date +%s) - s)) "$("$PY" -c "import json; e = json.load(open('$OUT/env.json')); print(e.get('gpu'), 'sm', e.get('capability'), 'torch', e.get('torch'), 'CUDA', e.get('torch_cuda'), 'triton', e.get('triton'))" 2>&1)"
fi

# ------------------------------------------------------------------------------------------------ 1. build
backends_here() { "$PY" -c "import lofit_fast; print(','.join(lofit_fast.available_backends()))" 2>/dev/null | tail -n 1; }
if [ "$DRY" -eq 1 ]; then
    # The CPU extension only (a CPU torch builds no CUDA sources, csrc/cuda). In place, incrementally, and only when
    # one of its sources is newer than the extension: on a fresh CI clone the install has just built it.
    so=$(ls lofit_fast/_C*.so 2>/dev/null | head -n 1)
    stale=$([ -z "$so" ] && echo "no extension yet" || find csrc setup.py -path csrc/cuda -prune -o -type f -newer "$so" \
        -print 2>/dev/null | head -n 3 | tr '\n' ' ')
    if [ -n "$stale" ]; then
        run build 240 150 "$WORK/logs/build.log" env MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace \
            --build-temp build/gpu_check_dry
        note="CPU extension rebuilt ($stale); CUDA build skipped: no CUDA"
    else
        RC=0 SECS=0
        echo "lofit_fast/_C is newer than csrc/ and setup.py: not rebuilt" >"$WORK/logs/build.log"
        note="CPU extension up to date ($so), not rebuilt; CUDA build skipped: no CUDA"
    fi
    b=$(backends_here)
    [ $RC -eq 0 ] && [[ ",$b," != *",cpp,"* ]] && RC=1 && note="$note; but the cpp backend does not load"
    [ $RC -eq 0 ] && BUILD_OK=1
    record build "$(status_of $RC)" "$SECS" "$note; backends: $b"
else
    # Hopper (9.0) unless TORCH_CUDA_ARCH_LIST says otherwise; on another GPU, its own architecture (a 9.0-only
    # build would load and then fail at every launch there)
    ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
    cap=$("$PY" -c "import json; print(json.load(open('$OUT/env.json')).get('capability', ''))" 2>/dev/null)
    arch_note=""
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$cap" ] && [ "$cap" != "9.0" ]; then
        ARCH=$cap
        arch_note=" (the GPU is sm $cap, not 9.0)"
    fi
    # ninja rebuilds only what changed when build/ survives from an earlier call
    run build 200 225 "$WORK/logs/build.log" env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace
    b=$(backends_here)
    note="TORCH_CUDA_ARCH_LIST=$ARCH$arch_note, MAX_JOBS=$(nproc); backends: $b"
    if [ $RC -eq 0 ] && [[ ",$b," != *",cuda,"* ]]; then
        RC=1
        note="$note; built, but the cuda backend does not load: $("$PY" -c "import lofit_fast.ops as o; print(o.unavailable_reason('cuda'))" 2>&1 | tail -n 1)"
    fi
    [ $RC -ne 0 ] && [ $RC -ne 200 ] && note="$note; $(grep -m1 -iE 'error' "$WORK/logs/build.log" | cut -c1-200)"
    [ $RC -eq 0 ] && BUILD_OK=1
    [ $BUILD_OK -eq 0 ] && note="$note; SKIPPING what needs it: test_cuda.py, cuda memcheck, cuda and fused-cuda timings"
    record build "$(status_of $RC)" "$SECS" "$note"
fi

# ------------------------------------------------------------------------------------------------ 2. tests
TEST_FILES=(tests/test_triton.py)
if [ "$BUILD_OK" -eq 1 ] || [ "$DRY" -eq 1 ]; then
    TEST_FILES+=(tests/test_cuda.py)
fi
PYTEST_OPTS=(-m "not slow" -x -q -rs -p no:cacheprovider --durations=15 -o faulthandler_timeout=60
    # CPU-side compile checks, no GPU needed: the build stage compiles the same CUDA sources, and CI's pytest runs
    # both on every commit; here they would only spend the budget
    --deselect tests/test_cuda.py::test_cuda_sources_compile_with_nvcc
    --deselect tests/test_cuda.py::test_sm90_kernel_report_has_no_spills)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_OPTS+=(--timeout=90)
    per_test="per-test timeout 90 s (pytest-timeout)"
else
    per_test="no pytest-timeout here: the stage's timeout bounds the tests"
fi
run tests 150 165 "$OUT/tests.log" "$PY" -m pytest "${TEST_FILES[@]}" "${PYTEST_OPTS[@]}"
note="${TEST_FILES[*]}: $(last_line "$OUT/tests.log"); $per_test"
[ "$BUILD_OK" -eq 0 ] && [ "$DRY" -eq 0 ] && note="$note; test_cuda.py skipped: build failed"
[ "$DRY" -eq 1 ] && note="$note; on the CPU the GPU cases skip and Triton runs in the interpreter"
[ $RC -eq 200 ] && echo "tests: skipped (no time left in the ${BUDGET} s budget)" >>"$OUT/tests.log"
record tests "$(status_of $RC)" "$SECS" "$note"

# ------------------------------------------------------------------------------------------------ 3. memcheck
# The public op, forward + backward, on small ragged shapes, against a float64 reference (the check that the
# kernels compute the right thing while the sanitizer watches every access).
cat >"$WORK/memcheck_driver.py" <<'EOF'
import math, sys
import torch
import lofit_fast

device, backends = sys.argv[1], [b for b in sys.argv[2].split(",") if b]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
torch.manual_seed(0)
# name, N, H, d, D_out, heads, with A, with v, with bias, x layout
CASES = [("ragged_strided", 77, 9, 64, 200, [0, 4, 8], True, True, True, "strided"),
         ("decode_1", 1, 9, 64, 200, [3], True, True, False, "contiguous"),
         ("decode_5_v", 5, 4, 128, 136, [0, 3], False, True, True, "contiguous"),
         ("all_heads_A", 33, 4, 128, 96, [0, 1, 2, 3], True, False, True, "contiguous"),
         ("ragged_d32", 19, 8, 32, 72, [1, 2, 7], True, True, True, "offset")]


def make(N, H, d, D_out, heads, with_A, with_v, with_bias, layout):
    C = H * d
    if layout == "strided":  # column stride 2
        x = torch.randn(N, 2 * C, device=device).to(dtype)[:, ::2]
    elif layout == "offset":
        x = torch.randn(N, C + 3, device=device).to(dtype)[:, 3:]
    else:
        x = torch.randn(N, C, device=device).to(dtype)
    W = (torch.randn(D_out, C, device=device) / math.sqrt(C)).to(dtype)
    b = torch.randn(D_out, device=device).to(dtype) if with_bias else None
    h = torch.tensor(heads, device=device, dtype=torch.int64)
    A = 0.5 * torch.randn(len(heads), d, device=device) if with_A else None
    v = 0.5 * torch.randn(len(heads), d, device=device) if with_v else None
    return x, W, b, h, A, v


def reference(x, W, b, h, A, v, d, dy):
    x64 = x.detach().double().requires_grad_(True)
    A64 = None if A is None else A.detach().double().requires_grad_(True)
    v64 = None if v is None else v.detach().double().requires_grad_(True)
    cols = (h[:, None] * d + torch.arange(d, device=x.device)).reshape(-1)
    sel = x64[:, cols]
    if A64 is not None:
        sel = sel * (1 + A64.reshape(-1))
    if v64 is not None:
        sel = sel + v64.reshape(-1)
    xp = x64.index_copy(1, cols, sel)
    y = xp @ W.double().T + (0 if b is None else b.double())
    named = [(n, t) for n, t in (("x", x64), ("A", A64), ("v", v64)) if t is not None]
    grads = torch.autograd.grad(y, [t for _, t in named], dy.double())
    return y, {n: g for (n, _), g in zip(named, grads)}


bad = 0
for backend in backends:
    for name, N, H, d, D_out, heads, wA, wv, wb, layout in CASES:
        x, W, b, h, A, v = make(N, H, d, D_out, heads, wA, wv, wb, layout)
        dy = torch.randn(N, D_out, device=device).to(dtype)
        ref_y, ref_g = reference(x, W, b, h, A, v, d, dy)
        for thin in (False, True):  # thin: x needs no gradient (only A / v)
            xi = x.detach().requires_grad_(not thin)
            Ai = None if A is None else A.clone().requires_grad_(True)
            vi = None if v is None else v.clone().requires_grad_(True)
            y = lofit_fast.head_affine_linear(xi, W, b, h, Ai, vi, d, backend=backend)
            with torch.no_grad():
                y_nograd = lofit_fast.head_affine_linear(xi, W, b, h, Ai, vi, d, backend=backend)
            names = [n for n, t in (("x", xi), ("A", Ai), ("v", vi)) if t is not None and t.requires_grad]
            grads = torch.autograd.grad(y, [t for t in (xi, Ai, vi) if t is not None and t.requires_grad], dy)
            if device == "cuda":
                torch.cuda.synchronize()
            checks = {"y": (y, ref_y), "y_nograd": (y_nograd, ref_y)}
            checks.update({f"d{n}": (g, ref_g[n]) for n, g in zip(names, grads)})
            for what, (got, ref) in checks.items():
                err = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                ok = err <= tol
                bad += not ok
                print(f"{backend:6s} {name:15s} {'thin' if thin else 'full':4s} {what:8s} rel err {err:.2e}"
                      f"{'' if ok else '  FAILED (bound %.0e)' % tol}")
print("memcheck driver:", "FAILED" if bad else "ok", f"({bad} checks over the bound)")
sys.exit(1 if bad else 0)
EOF
if [ "$DRY" -eq 1 ]; then
    # No GPU, so no compute-sanitizer: run the driver itself (the same op calls and checks) on the CPU.
    run memcheck 60 145 "$WORK/logs/memcheck.log" "$PY" "$WORK/memcheck_driver.py" cpu triton
    record memcheck "$(status_of $RC)" "$SECS" "compute-sanitizer skipped: no CUDA; the driver alone on the CPU (triton, interpreter): $(last_line "$WORK/logs/memcheck.log")"
else
    SAN=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -z "$SAN" ]; then
        record memcheck skipped 0 "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"
    else
        run memcheck_probe 60 165 "$WORK/logs/memcheck_probe.log" "$SAN" --tool memcheck --error-exitcode 3 "$PY" -c \
            "import torch; x = torch.arange(4096, device='cuda', dtype=torch.float32); y = (x * 2).sum(); torch.cuda.synchronize(); print('probe sum', y.item())"
        if [ $RC -ne 0 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$WORK/logs/memcheck_probe.log"; then
            record memcheck "skipped" "$SECS" "compute-sanitizer does not work on this machine (probe on a trivial torch op: $(status_of $RC); $(last_line "$WORK/logs/memcheck_probe.log"))"
        else
            mc_backends=triton
            [ "$BUILD_OK" -eq 1 ] && mc_backends=triton,cuda
            # No caching allocator: every tensor is its own allocation, so an out-of-bounds access cannot land
            # silently inside a neighbour.
            run memcheck 120 145 "$WORK/logs/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
                --error-exitcode 3 "$PY" "$WORK/memcheck_driver.py" cuda "$mc_backends"
            note="backends $mc_backends; $(grep -m1 'ERROR SUMMARY' "$WORK/logs/memcheck.log"); $(grep -m1 'memcheck driver' "$WORK/logs/memcheck.log")"
            [ "$BUILD_OK" -eq 0 ] && note="$note; cuda skipped: build failed"
            record memcheck "$(status_of $RC)" "$SECS" "$note"
        fi
    fi
fi

# ------------------------------------------------------------------------------------------------ 4. op timings
if [ "$DRY" -eq 1 ]; then
    run op 90 105 "$WORK/logs/op.log" "$PY" bench/op_bench.py --device cpu --dtype fp32 --shapes tiny --n 1,8 \
        --cases 4,4:both,all --modes fwd,full --providers linear,torch,cpp,triton,hooks,hooks_loop --rep-ms 20 \
        --min-reps 3 --out "$OUT/op.csv"
    note="tiny shape on the CPU (torch, cpp, triton under the interpreter, hooks); cuda skipped: no CUDA"
else
    providers=linear,triton,hooks,hooks_loop
    [ "$BUILD_OK" -eq 1 ] && providers=linear,cuda,triton,hooks,hooks_loop
    run op 110 105 "$WORK/logs/op.log" "$PY" bench/op_bench.py --preset gpu-check --providers "$providers" \
        --out "$OUT/op.csv"
    note="providers $providers"
    [ "$BUILD_OK" -eq 0 ] && note="$note; cuda skipped: build failed"
fi
rows=$([ -f "$OUT/op.csv" ] && echo $(($(wc -l <"$OUT/op.csv") - 1)) || echo 0)
fails=$(grep -c '^FAILED' "$WORK/logs/op.log" 2>/dev/null)
record op "$(status_of $RC)" "$SECS" "$note; $rows rows${fails:+, $fails failed cases}"

# ------------------------------------------------------------------------------------------------ 5. decode
if [ "$DRY" -eq 1 ]; then
    run decode 40 90 "$WORK/logs/decode.log" "$PY" bench/decode_bandwidth.py --device cpu --C 256 --D-out 96 \
        --head-dim 32 --dtype float32 --n 1 8 --heads 4 --reps 2 --copies 2 --providers torch,cpp,triton \
        --csv "$OUT/decode.csv"
    note="CPU wall clock, tiny shape (code path only); CUDA graphs skipped: no CUDA"
else
    providers=triton
    [ "$BUILD_OK" -eq 1 ] && providers=cuda,triton
    run decode 40 90 "$WORK/logs/decode.log" "$PY" bench/decode_bandwidth.py --n 1 8 --heads 4 --providers "$providers" \
        --csv "$OUT/decode.csv"
    note="Llama-2-7B o_proj bf16, A and v on 4 heads, CUDA graphs; providers linear,$providers"
fi
record decode "$(status_of $RC)" "$SECS" "$note; $(grep -m1 'copy' "$WORK/logs/decode.log" | cut -c1-120)"

# ------------------------------------------------------------------------------------------------ 6. end to end
mkdir -p "$WORK/e2e"
if [ "$DRY" -eq 1 ]; then
    SIGNAL=INT run e2e 120 0 "$WORK/logs/e2e.log" "$PY" bench/e2e_bench.py --device cpu --model tiny \
        --workloads step1,step2,decode --providers floor,fused-triton,hooks,hooks_loop,lora,base,merged \
        --steps 2 --warmup 1 --infer-steps 2 --batch 2 --seq 32 --decode-batch 1,8 --decode-prompt 8 --decode-new 4 \
        --threads 1 --no-report --results "$WORK/e2e"
    note="tiny random model on the CPU; fused-cuda skipped: no CUDA"
else
    fused=fused-triton
    [ "$BUILD_OK" -eq 1 ] && fused=fused-cuda,fused-triton
    # SIGINT first: e2e_bench stops and keeps the rows of the workloads it finished
    SIGNAL=INT run e2e 170 0 "$WORK/logs/e2e.log" "$PY" bench/e2e_bench.py --device cuda --model llama2-7b \
        --workloads step1,step2,decode --providers "floor,$fused,hooks,hooks_loop,lora,base,merged" \
        --steps 5 --warmup 1 --infer-steps 3 --decode-batch 1,8 --decode-new 16 --no-report --results "$WORK/e2e"
    note="random-weight Llama-2-7B bf16, batch 8 x 512, decode batch 1 and 8 x 16 new tokens; $fused"
    [ "$BUILD_OK" -eq 0 ] && note="$note; fused-cuda skipped: build failed"
fi
[ -f "$WORK/e2e/e2e.csv" ] && cp "$WORK/e2e/e2e.csv" "$OUT/e2e.csv"
cp "$WORK/e2e/e2e_runs.jsonl" "$WORK/logs/" 2>/dev/null
rows=$([ -f "$OUT/e2e.csv" ] && echo $(($(wc -l <"$OUT/e2e.csv") - 1)) || echo 0)
err=""
[ $RC -ne 0 ] && err="; $(grep -E 'Error|error' "$WORK/logs/e2e.log" | tail -n 1 | cut -c1-200)"
record e2e "$(status_of $RC)" "$SECS" "$note; $rows rows$err"

# ------------------------------------------------------------------------------------------------ 7-8. dispatch, summary
finish
exit $FAILED
