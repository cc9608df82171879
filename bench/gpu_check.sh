#!/usr/bin/env bash
# The one-shot GPU check (DESIGN §8): correctness, benchmarks and the memory checker, in that
# order, each stage under its own time limit, all of it in under 5 minutes.
#
#   bash bench/gpu_check.sh OUTDIR
#
# For a machine with a CUDA GPU, CuPy, Numba and PyTorch already installed, and no network.
# It installs nothing and runs from the source tree (PYTHONPATH=src python -m convgrad ...).
# A stage that fails or times out is recorded and the next one still runs.  It writes at most
# 8 files into OUTDIR:
#
#   summary.md              the table printed at the end, with the GPU and the versions
#   stage1-tests.json       the GPU part of the test suite on cupy and numba
#   stage2-fp32.json/.png   bench resnet50 + mobilenetv2-dw, fp32 strict, against PyTorch
#   stage3-bf16.json        bench resnet50 in bf16, channels-last (tensor cores)
#   stage4-tf32.json        bench resnet50 with TF32 on both sides, channels-last (tensor cores)
#   stage5-sanitizer.json   compute-sanitizer memcheck on small cases, pools off
#   logs.tar.gz             every stage's full output
#
# Stage limits in seconds can be changed with GPU_CHECK_LIMITS="80 95 30 30 45", and the
# backends checked (default: cupy and numba where available) with GPU_CHECK_BACKENDS="cupy".
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
read -r -a LIMITS <<<"${GPU_CHECK_LIMITS:-80 95 30 30 45}"
WORK=$(mktemp -d)
LOGS="$WORK/logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
STATUS="$LOGS/status.tsv"
printf 'stage\tstatus\trc\tseconds\tfile\n' >"$STATUS"
START=$(date +%s)

# run_stage NAME LIMIT LOG COMMAND...: run under `timeout`, append one status line, never abort.
run_stage() {
    local name=$1 limit=$2 log=$3 file=$4
    shift 4
    local began rc status
    began=$(date +%s)
    echo "== $name (limit ${limit}s)" >&2
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137 | 130) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - began))" "$file" >>"$STATUS"
    return 0
}

skip_stage() {
    printf '%s\tskipped\t-\t0\t%s\n' "$1" "$2" >>"$STATUS"
    echo "$3" >"$LOGS/$1.log"
}

# The machine, for the summary and the logs.
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not found"
    echo
    "$PYTHON" - <<'PY' 2>&1
import importlib.metadata as m, platform
print("python", platform.python_version())
for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "torch", "ml_dtypes"):
    try:
        print(dist, m.version(dist))
    except m.PackageNotFoundError:
        pass
import convgrad
print("convgrad", convgrad.__version__, "backends:", ", ".join(convgrad.backends.available()))
PY
    git -C "$ROOT" rev-parse HEAD 2>/dev/null
} >"$LOGS/machine.log"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
GPU_BACKENDS=${GPU_CHECK_BACKENDS:-$(timeout 60 "$PYTHON" -c "import convgrad; print(' '.join(n for n in convgrad.backends.available(include_emulated=False) if n in ('cupy', 'numba')))" 2>>"$LOGS/machine.log")}
BACKEND_ARGS=()
for name in $GPU_BACKENDS; do BACKEND_ARGS+=(--backend "$name"); done
echo "GPU: ${GPU_NAME:-none found}; GPU backends: ${GPU_BACKENDS:-none}" >&2

# 1. Correctness: the shared suite (GPU-sized cases included) and the determinism / large tests.
if [ -n "$GPU_BACKENDS" ]; then
    run_stage stage1-tests "${LIMITS[0]}" "$LOGS/stage1-tests.log" stage1-tests.json bash -c '
        "$0" -m pytest tests/test_passes.py "${@}" --run-slow -q -p no:cacheprovider
        first=$?
        "$0" -m pytest tests "${@}" --run-slow -q -p no:cacheprovider -k "determinis or large"
        second=$?
        [ "$second" -eq 5 ] && second=0   # no such tests collected
        [ "$first" -ne 0 ] && exit "$first"
        exit "$second"' "$PYTHON" "${BACKEND_ARGS[@]}"
else
    skip_stage stage1-tests stage1-tests.json "no GPU backend (cupy, numba) is available"
fi

# 2-4. Benchmarks against PyTorch (cuDNN, benchmark mode, TF32 set the same on both sides).
bench() {
    local name=$1 limit=$2
    shift 2
    run_stage "$name" "$limit" "$LOGS/$name.log" "$name.json" \
        "$PYTHON" -m convgrad bench "${BACKEND_ARGS[@]}" --reference torch --no-progress --json "$OUT/$name.json" "$@"
}
if [ -n "$GPU_BACKENDS" ]; then
    bench stage2-fp32 "${LIMITS[1]}" --suite resnet50 --suite mobilenetv2-dw --dtype float32 --repeats 10 \
        --plot "$OUT/stage2-fp32.png"
    # Channels-last: the tensor-core kernels' fast path (and what the speed targets are set for).
    bench stage3-bf16 "${LIMITS[2]}" --suite resnet50 --dtype bfloat16 --layout nhwc --repeats 5
    bench stage4-tf32 "${LIMITS[3]}" --suite resnet50 --dtype float32 --allow-tf32 --layout nhwc --repeats 5
else
    for name in stage2-fp32 stage3-bf16 stage4-tf32; do
        skip_stage "$name" "$name.json" "no GPU backend (cupy, numba) is available"
    done
fi

# 5. compute-sanitizer memcheck on small cases, with CuPy's memory pools off (a pool hides
#    out-of-bounds accesses inside its large blocks).
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$GPU_BACKENDS" ] && [ -n "$SANITIZER" ]; then
    cat >"$WORK/memcheck_driver.py" <<'PY'
"""Small cases of every pass on the named backends, for compute-sanitizer; pools off."""
import sys

import numpy as np

try:
    import cupy

    cupy.cuda.set_allocator(None)
    cupy.cuda.set_pinned_memory_allocator(None)
except ImportError:
    pass
import convgrad
from convgrad.problem import conv_problem
from convgrad.testing import reference_forward, reference_grad_input, reference_grad_weight

# (ndim, N, C, K, spatial, kernel, stride, padding, dilation, groups, channels_last, dtype)
CASES = [
    (2, 2, 3, 5, (7, 9), (3, 3), 1, 1, 1, 1, False, "float32"),
    (2, 2, 4, 6, (9, 8), (3, 2), 2, 1, 1, 2, False, "float32"),
    (2, 1, 4, 4, (8, 8), (3, 3), 1, 2, 2, 4, False, "float32"),
    (2, 2, 16, 32, (6, 6), (3, 3), 1, 1, 1, 1, True, "float16"),
    (2, 2, 16, 16, (5, 7), (1, 1), 1, 0, 1, 1, False, "float64"),
    (1, 2, 3, 4, (17,), (5,), 2, 2, 1, 1, False, "float32"),
    (3, 1, 2, 3, (4, 5, 6), (3, 3, 3), 1, 1, 1, 1, False, "float32"),
]
failures = 0
rng = np.random.default_rng(0)
for backend in sys.argv[1:]:
    for ndim, N, C, K, size, kernel, stride, padding, dilation, groups, cl, dtype in CASES:
        x_shape = (N, *size, C) if cl else (N, C, *size)
        w_shape = (K, *kernel, C // groups) if cl else (K, C // groups, *kernel)
        problem = conv_problem(f"conv{ndim}d", ndim, x_shape, w_shape, stride, padding, dilation, groups, dtype=dtype,
                               channels_last=cl)
        x = rng.integers(-3, 4, x_shape).astype(dtype)
        w = rng.integers(-3, 4, w_shape).astype(dtype)
        common = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, channels_last=cl, backend=backend)
        name = problem.name("fprop")
        try:
            y = np.asarray(getattr(convgrad, f"conv{ndim}d")(x, w, None, **common))
            dx = getattr(convgrad, f"conv{ndim}d_input")(x_shape, w, y, **common)
            dw = getattr(convgrad, f"conv{ndim}d_weight")(x, w_shape, y, **common)
        except (TypeError, ValueError) as error:
            print(f"{backend} {name}: not supported: {error}")
            continue
        logical = (lambda a: np.moveaxis(np.asarray(a, np.float64), -1, 1)) if cl else (lambda a: np.asarray(a, np.float64))
        five = lambda a: a.reshape(a.shape[0], a.shape[1], *([1] * (3 - ndim)), *a.shape[2:])
        xl, wl, yl = five(logical(x)), five(logical(w)), five(logical(y))
        ok = (np.allclose(yl, reference_forward(xl, wl, problem), rtol=1e-2, atol=1e-2)
              and np.allclose(five(logical(dx)), reference_grad_input(yl, wl, problem), rtol=1e-2, atol=1e-1)
              and np.allclose(five(logical(dw)), reference_grad_weight(xl, yl, problem), rtol=1e-2, atol=1e-1))
        failures += not ok
        print(f"{backend} {name}: {'ok' if ok else 'WRONG RESULT'}")
print(f"memcheck driver: {failures} wrong result(s)")
sys.exit(1 if failures else 0)
PY
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage stage5-sanitizer "${LIMITS[4]}" "$LOGS/stage5-sanitizer.log" \
        stage5-sanitizer.json "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 86 --print-limit 20 \
        "$PYTHON" "$WORK/memcheck_driver.py" $GPU_BACKENDS
elif [ -z "$SANITIZER" ]; then
    skip_stage stage5-sanitizer stage5-sanitizer.json "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"
else
    skip_stage stage5-sanitizer stage5-sanitizer.json "no GPU backend (cupy, numba) is available"
fi

# One JSON per stage (the bench stages wrote theirs; the others get one from their logs), then
# the summary, then the logs.
"$PYTHON" - "$OUT" "$LOGS" "$STATUS" "${GPU_NAME:-unknown GPU}" "$(($(date +%s) - START))" <<'PY'
import csv, json, math, re, sys
from pathlib import Path

out, logs, status_file, gpu, total = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
stages = list(csv.DictReader(status_file.open(), delimiter="\t"))
rows = []
for stage in stages:
    name, log = stage["stage"], logs / f"{stage['stage']}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    target = out / stage["file"]
    detail = ""
    if name.startswith("stage1") or name.startswith("stage5"):
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected).*?)\s*=*$", text, re.M)
        sanitizer = re.findall(r"ERROR SUMMARY: \d+ errors?", text)
        wrong = re.findall(r"memcheck driver: \d+ wrong result\(s\)", text)
        last = text.strip().splitlines()[-1:] or [""]
        detail = "; ".join(counts + sanitizer + wrong) or last[0]
        target.write_text(json.dumps({"stage": name, **stage, "detail": detail, "tail": text[-4000:]}, indent=1) + "\n")
    else:
        try:
            document = json.loads(target.read_text())
        except (OSError, ValueError):
            document = None
            target.write_text(json.dumps({"stage": name, **stage, "error": "no JSON written", "tail": text[-4000:]},
                                         indent=1) + "\n")
        if document and "summary" in document:
            parts = []
            for backend, passes in document["summary"].items():
                ratios = " ".join(f"{p} {s['geomean_ratio']:.2f}x" for p, s in passes.items() if s["geomean_ratio"])
                bad = sum(s["mismatches"] for s in passes.values())
                parts.append(f"{backend}: {ratios or 'no timings'}" + (f" ({bad} mismatch/error)" if bad else ""))
            if document["meta"].get("interrupted"):
                parts.append("partial (interrupted)")
            detail = "; ".join(parts)
        elif stage["status"] == "skipped":
            detail = text.strip()
    rows.append((name, stage["status"], stage["rc"], stage["seconds"], detail.replace("|", "/")))
lines = [f"# GPU check on {gpu}", "", f"Total {total} s. Bench ratios are geometric means of "
         "PyTorch time / convgrad time (above 1: convgrad faster).", "",
         "| stage | status | rc | seconds | detail |", "|---|---|---|---:|---|"]
lines += [f"| {' | '.join(map(str, row))} |" for row in rows]
machine = (logs / "machine.log").read_text(errors="replace") if (logs / "machine.log").exists() else ""
versions = [l for l in machine.splitlines() if re.match(r"^(python|numpy|cupy|numba|torch|ml_dtypes|convgrad) ", l)]
lines += ["", "Versions: " + "; ".join(versions)]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo
cat "$OUT/summary.md"
