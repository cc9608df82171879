#!/usr/bin/env bash
# The one-shot GPU check (DESIGN §8), sized for a borrowed GPU: at most 8 minutes from a cold
# cache, machine start not included.
#
#   bash bench/gpu_check.sh OUTDIR
#
# For a machine with a CUDA GPU, CuPy, Numba and PyTorch already installed, and no network. It
# installs nothing and runs from the source tree (PYTHONPATH=src). The stages run in the order
# of what they prove: the kernels compile (cold); each GPU backend computes the right answers;
# then how fast. Each stage names the issue it verifies, runs under its own time limit (cut
# further so the whole run stays within the budget), and a stage that fails or times out is
# recorded while the next one still runs. After every stage OUTDIR is brought up to date, so a
# run cut short keeps what it had. OUTDIR receives at most 8 files:
#
#   summary.md            one row per stage: issue, status, seconds, what it found
#   results.json          the same, with the machine, versions and each stage's output tail
#   precompile.json       what the cold compile built, per backend, and how long it took
#   bench-bf16.json       ResNet-50 in bfloat16 (tensor cores), cupy against PyTorch
#   bench-fp32.json       ResNet-50 in strict fp32 (SIMT), cupy and numba against PyTorch
#   bench-depthwise.json  MobileNetV2's depthwise layers, fp32, against PyTorch
#   bench-model.json      a patched ResNet-18 training step against native (convgrad bench --model)
#   logs.tar.gz           every stage's full output
#
# Settings: GPU_CHECK_BACKENDS="cupy numba" (default: the GPU backends available),
# GPU_CHECK_BUDGET_S=480 (the whole run), GPU_CHECK_SCALE=1.0 (multiplies every stage limit),
# GPU_CHECK_KEEP_CACHE=1 (use the usual compile caches instead of empty ones).
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
BUDGET=${GPU_CHECK_BUDGET_S:-480}
SCALE=${GPU_CHECK_SCALE:-1.0}
RESERVE=15 # seconds kept for the final report
START=$(date +%s)
WORK=$(mktemp -d)
LOGS="$WORK/logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
STATUS="$LOGS/status.tsv"
printf 'stage\tissue\tstatus\trc\tseconds\tlimit\tfile\tproves\n' >"$STATUS"

# "From a cold cache": empty compile caches for this run, shared by all its stages.
if [ "${GPU_CHECK_KEEP_CACHE:-0}" != 1 ]; then
    export CUPY_CACHE_DIR="$WORK/cache/cupy" NUMBA_CACHE_DIR="$WORK/cache/numba" \
        CONVGRAD_CACHE_DIR="$WORK/cache/convgrad"
fi

# The stages, in order: name, issue verified, time limit (s), what it proves. The limits add up
# to about 455 s; with the machine description and the report that is within the 480 s budget.
STAGES=(
    "precompile|10|90|every kernel a ResNet-50 and MobileNetV2 training step needs compiles, cold"
    "tests-cupy|4|75|cupy: the shared suite (slow cases too), run-to-run determinism, tensors past 2^31 elements"
    "torch-cuda|10|40|convgrad.torch on CUDA tensors: gradients, and training in float32 and bfloat16"
    "tests-numba|3|60|numba: the shared suite (slow cases too) and run-to-run determinism"
    "sanitizer|4|45|compute-sanitizer memcheck of every pass on small cases, memory pools off"
    "bench-bf16|12|45|ResNet-50 in bfloat16 on tensor cores, against cuDNN"
    "bench-fp32|11|50|ResNet-50 in strict fp32 on the SIMT kernels, against cuDNN"
    "bench-depthwise|11|25|MobileNetV2 depthwise layers against PyTorch"
    "bench-model|13|25|a patched model's training step against the native one"
)

elapsed() { echo $(($(date +%s) - START)); }

# record NAME ISSUE STATUS RC SECONDS LIMIT FILE PROVES: one status line, then OUTDIR brought up to date.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STATUS"
    report
}

# run_stage NAME ISSUE LIMIT PROVES FILE COMMAND...: run under `timeout`, record it, never abort.
run_stage() {
    local name=$1 issue=$2 limit=$3 proves=$4 file=$5
    shift 5
    local left began rc status
    limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
    left=$((BUDGET - RESERVE - $(elapsed)))
    if [ "$left" -lt 10 ]; then
        echo "no time left in the ${BUDGET} s budget" >"$LOGS/$name.log"
        record "$name" "$issue" skipped - 0 0 "$file" "$proves"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    began=$(date +%s)
    echo "== $name (issue $issue, limit ${limit}s, at $(elapsed)s)" >&2
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$issue" "$status" "$rc" "$(($(date +%s) - began))" "$limit" "$file" "$proves"
}

skip_stage() {
    local name=$1 issue=$2 proves=$3 file=$4 reason=$5
    echo "$reason" >"$LOGS/$name.log"
    record "$name" "$issue" skipped - 0 0 "$file" "$proves"
}

# summary.md, results.json and logs.tar.gz from what has run so far.
report() {
    "$PYTHON" "$WORK/report.py" "$OUT" "$LOGS" "$STATUS" "${GPU_NAME:-unknown GPU}" "$(elapsed)" "$BUDGET" \
        >>"$LOGS/report.log" 2>&1
    tar -czf "$OUT/logs.tar.gz.part" -C "$WORK" logs && mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

cat >"$WORK/report.py" <<'PY'
"""Writes summary.md and results.json from the stages recorded so far."""
import csv, json, re, sys
from pathlib import Path

out, logs, status_file, gpu, total, budget = (Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4],
                                               sys.argv[5], sys.argv[6])
stages = list(csv.DictReader(status_file.open(), delimiter="\t"))
rows = []
for stage in stages:
    log = logs / f"{stage['stage']}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    detail = ""
    target = out / stage["file"] if stage["file"] != "-" else None
    document = None
    if target is not None and target.suffix == ".json" and target.exists():
        try:
            document = json.loads(target.read_text())
        except ValueError:
            document = None
    if document and "summary" in document:
        parts = []
        for backend, passes in document["summary"].items():
            ratios = " ".join(f"{p} {s['geomean_ratio']:.2f}x" for p, s in passes.items() if s.get("geomean_ratio"))
            bad = sum(s.get("mismatches", 0) for s in passes.values())
            parts.append(f"{backend}: {ratios or 'no timings'}" + (f" ({bad} mismatch/error)" if bad else ""))
        if document.get("meta", {}).get("interrupted"):
            parts.append("partial (interrupted)")
        detail = "; ".join(parts)
    elif document and "models" in document:
        detail = "; ".join(f"{r['model']}: native {r['native_time_s'] * 1e3:.1f} ms, patched "
                           f"{r['patched_time_s'] * 1e3:.1f} ms, {r['ratio']:.2f}x" for r in document["models"])
        if document.get("meta", {}).get("gradient_failure"):
            detail = f"GRADIENT MISMATCH: {document['meta']['gradient_failure']}"
    elif document and "reports" in document:
        detail = "; ".join(f"{r['backend']}: {r['kernels']} kernels in {r['seconds']:.1f} s" for r in document["reports"])
    else:
        counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped|deselected).*?)\s*=*$", text, re.M)
        found = re.findall(r"ERROR SUMMARY: \d+ errors?|memcheck driver: \d+ wrong result\(s\)", text)
        last = text.strip().splitlines()[-1:] or [""]
        detail = "; ".join(counts + found) or last[0]
    rows.append({**stage, "detail": detail[:400], "tail": text[-3000:]})
machine = (logs / "machine.log").read_text(errors="replace") if (logs / "machine.log").exists() else ""
versions = [l for l in machine.splitlines() if re.match(r"^(python|numpy|cupy|numba|torch|ml_dtypes|convgrad) ", l)]
json.dump({"gpu": gpu, "total_s": int(total), "budget_s": int(budget), "versions": versions, "machine": machine[-4000:],
           "stages": rows}, (out / "results.json").open("w"), indent=1)
lines = [f"# GPU check on {gpu}", "", f"{total} s of the {budget} s budget (cold compile caches unless "
         "GPU_CHECK_KEEP_CACHE=1). Bench ratios are geometric means of PyTorch time / convgrad time "
         "(above 1: convgrad faster).", "",
         "| stage | issue | status | seconds | limit | what it proves | found |", "|---|---|---|---:|---:|---|---|"]
for row in rows:
    cells = [row["stage"], f"#{row['issue']}", row["status"], row["seconds"], row["limit"], row["proves"], row["detail"]]
    lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
lines += ["", "Versions: " + "; ".join(versions)]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY

# The machine, for the summary and the logs.
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not found"
    echo
    timeout 60 "$PYTHON" - <<'PY' 2>&1
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
GPU_BACKENDS=${GPU_CHECK_BACKENDS-$(timeout 60 "$PYTHON" -c "import convgrad; print(' '.join(n for n in convgrad.backends.available(include_emulated=False) if n in ('cupy', 'numba')))" 2>>"$LOGS/machine.log")}
echo "GPU: ${GPU_NAME:-none found}; GPU backends: ${GPU_BACKENDS:-none}" >&2
has_backend() { [[ " $GPU_BACKENDS " == *" $1 "* ]]; }
BACKEND_ARGS=()
for name in $GPU_BACKENDS; do BACKEND_ARGS+=(--backend "$name"); done
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | head -n 1)

cat >"$WORK/memcheck_driver.py" <<'PY'
"""Small cases of every pass on the named backends, for compute-sanitizer; memory pools off."""
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

# pytest_stage NAME ISSUE LIMIT PROVES BACKEND TESTS...: the named tests on one backend, slow cases included.
pytest_stage() {
    local name=$1 issue=$2 limit=$3 proves=$4 backend=$5
    shift 5
    run_stage "$name" "$issue" "$limit" "$proves" - \
        "$PYTHON" -m pytest "$@" --backend "$backend" --run-slow -q -p no:cacheprovider
}

bench_stage() {
    local name=$1 issue=$2 limit=$3 proves=$4
    shift 4
    run_stage "$name" "$issue" "$limit" "$proves" "$name.json" \
        "$PYTHON" -m convgrad bench --reference torch --no-progress --json "$OUT/$name.json" "$@"
}

for entry in "${STAGES[@]}"; do
    IFS='|' read -r name issue limit proves <<<"$entry"
    if [ -z "$GPU_BACKENDS" ]; then
        skip_stage "$name" "$issue" "$proves" - "no GPU backend (cupy, numba) is available"
        continue
    fi
    case $name in
        precompile)
            run_stage "$name" "$issue" "$limit" "$proves" precompile.json \
                "$PYTHON" -m convgrad precompile "${BACKEND_ARGS[@]}" --suite resnet50 --suite mobilenetv2-dw \
                --dtype float32,bfloat16 --layout nchw,nhwc --json "$OUT/precompile.json" ;;
        tests-cupy)
            if has_backend cupy; then
                pytest_stage "$name" "$issue" "$limit" "$proves" cupy tests/test_passes.py tests/test_determinism.py \
                    tests/test_large.py
            else skip_stage "$name" "$issue" "$proves" - "cupy is not available"; fi ;;
        torch-cuda)
            run_stage "$name" "$issue" "$limit" "$proves" - \
                "$PYTHON" -m pytest tests/test_torch.py -k cuda -q -p no:cacheprovider ;;
        tests-numba)
            if has_backend numba; then
                pytest_stage "$name" "$issue" "$limit" "$proves" numba tests/test_passes.py tests/test_determinism.py
            else skip_stage "$name" "$issue" "$proves" - "numba is not available"; fi ;;
        sanitizer)
            if [ -n "$SANITIZER" ]; then
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage "$name" "$issue" "$limit" "$proves" - "$SANITIZER" \
                    --tool memcheck --leak-check no --error-exitcode 86 --print-limit 20 \
                    "$PYTHON" "$WORK/memcheck_driver.py" $GPU_BACKENDS
            else skip_stage "$name" "$issue" "$proves" - "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"; fi ;;
        bench-bf16)
            if has_backend cupy; then
                # Channels-last: the layout the tensor-core kernels are fastest in.
                bench_stage "$name" "$issue" "$limit" "$proves" --backend cupy --suite resnet50 --dtype bfloat16 \
                    --layout nhwc --repeats 5
            else skip_stage "$name" "$issue" "$proves" "$name.json" "cupy is not available (numba has no bfloat16)"; fi ;;
        bench-fp32)
            bench_stage "$name" "$issue" "$limit" "$proves" "${BACKEND_ARGS[@]}" --suite resnet50 --dtype float32 \
                --repeats 5 ;;
        bench-depthwise)
            bench_stage "$name" "$issue" "$limit" "$proves" "${BACKEND_ARGS[@]}" --suite mobilenetv2-dw \
                --dtype float32 --repeats 10 ;;
        bench-model)
            if "$PYTHON" -m convgrad bench --help 2>/dev/null | grep -q -- "--model"; then
                bench_stage "$name" "$issue" "$limit" "$proves" --model resnet18 --device cuda --repeats 3
            else skip_stage "$name" "$issue" "$proves" "$name.json" "convgrad bench --model does not exist yet"; fi ;;
    esac
done

report
echo
cat "$OUT/summary.md"
