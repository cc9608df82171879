"""``bench/gpu_check.sh`` on a machine without a GPU: its structure, limits and what it leaves behind.

The script's GPU work is replaced by a stand-in ``python`` (``PYTHON=``) that answers
``-m convgrad ...`` and ``-m pytest ...`` quickly (or hangs, for one stage) and runs
everything else (the report) with the real interpreter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
BUDGET_S = 480
ORDER = ["precompile", "tests-cupy", "torch-cuda", "tests-numba", "sanitizer", "bench-bf16", "bench-fp32",
         "bench-depthwise", "bench-model"]


def _stages() -> list[tuple[str, int, int, str]]:
    text = SCRIPT.read_text()
    block = text[text.index("STAGES=("):]
    block = block[:block.index("\n)")]
    stages = []
    for name, issue, limit, proves in re.findall(r'"([\w-]+)\|(\d+)\|(\d+)\|([^"]+)"', block):
        stages.append((name, int(issue), int(limit), proves))
    return stages


def test_stages_are_ordered_by_what_they_prove_and_fit_the_budget():
    stages = _stages()
    assert [s[0] for s in stages] == ORDER
    first_speed = next(i for i, s in enumerate(stages) if s[0].startswith("bench-"))
    assert all(s[0].startswith("bench-") for s in stages[first_speed:])  # correctness before speed
    assert all(issue > 0 and proves for _, issue, _, proves in stages)
    # Every limit, the machine description (60 s at most, usually a few) and the report's reserve.
    assert sum(limit for _, _, limit, _ in stages) + 15 <= BUDGET_S - 10
    text = SCRIPT.read_text()
    assert f"BUDGET=${{GPU_CHECK_BUDGET_S:-{BUDGET_S}}}" in text
    for name in ORDER:
        assert re.search(rf"^\s+{re.escape(name)}\)$", text, re.M), f"no branch runs stage {name}"


def _fake_python(tmp_path: Path, hang: str = "") -> Path:
    """A ``python`` whose convgrad and pytest runs are instant (``hang``: this stage never ends)."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
args="$*"
json=""
prev=""
for a in "$@"; do [ "$prev" = "--json" ] && json=$a; prev=$a; done
case "$args" in
    *"-m convgrad bench --help"*) echo "usage: convgrad bench [--suite SUITE]"; exit 0 ;;
    *"-m convgrad precompile"*)
        echo '{{"reports": [{{"backend": "cupy", "kernels": 12, "seconds": 9.5}}]}}' >"$json"; exit 0 ;;
    *"-m convgrad bench"*)
        case "$json" in *{hang or "never"}*) sleep 600 ;; esac
        echo '{{"summary": {{"cupy": {{"fprop": {{"geomean_ratio": 0.8, "mismatches": 0}}}}}}, "meta": {{}}}}' >"$json"
        exit 0 ;;
    *"-m pytest"*)
        case "$args" in *{hang or "never"}*) sleep 600 ;; esac
        echo "12 passed in 1.0s"; exit 0 ;;
    *"-c import convgrad"*) echo "cupy numba"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def _env(fake: Path | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **extra}
    env["PYTHON"] = str(fake) if fake else sys.executable
    return env


def _summary_rows(outdir: Path) -> list[dict]:
    return json.loads((outdir / "results.json").read_text())["stages"]


def test_without_a_gpu_every_stage_is_recorded_as_skipped(tmp_path):
    outdir = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(outdir)], env=_env(None, GPU_CHECK_BACKENDS=""),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    rows = _summary_rows(outdir)
    assert [r["stage"] for r in rows] == ORDER and {r["status"] for r in rows} == {"skipped"}
    summary = (outdir / "summary.md").read_text()
    assert all(f"#{issue}" in summary for _, issue, _, _ in _stages())
    assert sorted(p.name for p in outdir.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]


def test_a_stage_that_times_out_keeps_earlier_results_and_later_stages_still_run(tmp_path):
    outdir = tmp_path / "out"
    env = _env(_fake_python(tmp_path, hang="bench-bf16"), GPU_CHECK_BACKENDS="cupy numba", GPU_CHECK_SCALE="0.1")
    began = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), str(outdir)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {r["stage"]: r for r in _summary_rows(outdir)}
    assert list(rows) == ORDER
    assert rows["bench-bf16"]["status"] == "timeout" and int(rows["bench-bf16"]["limit"]) == 4
    assert rows["precompile"]["status"] == "ok" and "12 kernels" in rows["precompile"]["detail"]
    assert rows["tests-cupy"]["status"] == "ok" and "12 passed" in rows["tests-cupy"]["detail"]
    assert rows["bench-fp32"]["status"] == "ok" and "0.80x" in rows["bench-fp32"]["detail"]
    assert rows["bench-model"]["status"] == "skipped"  # convgrad bench --model does not exist yet
    files = sorted(p.name for p in outdir.iterdir())
    assert len(files) <= 8 and {"summary.md", "results.json", "logs.tar.gz", "precompile.json"} <= set(files)
    assert time.monotonic() - began < 60


def test_the_budget_bounds_the_whole_run(tmp_path):
    # Enough beyond the 15 s reserve that the stages before the hanging one finish on a
    # loaded machine, so the hang is cut by the budget rather than never started.
    BUDGET = 45
    outdir = tmp_path / "out"
    env = _env(_fake_python(tmp_path, hang="test_passes"), GPU_CHECK_BACKENDS="cupy numba",
               GPU_CHECK_BUDGET_S=str(BUDGET))
    began = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), str(outdir)], env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    rows = {r["stage"]: r for r in _summary_rows(outdir)}
    assert rows["tests-cupy"]["status"] == "timeout"
    assert int(rows["tests-cupy"]["limit"]) <= BUDGET - 15
    assert any(r["status"] == "skipped" for r in rows.values())  # no time was left for some
    assert took < BUDGET + 15


def test_a_run_killed_midway_leaves_the_finished_stages(tmp_path):
    outdir = tmp_path / "out"
    env = _env(_fake_python(tmp_path, hang="test_passes"), GPU_CHECK_BACKENDS="cupy numba")
    process = subprocess.Popen(["bash", str(SCRIPT), str(outdir)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (outdir / "summary.md").exists():
            time.sleep(0.5)
        time.sleep(1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    summary = (outdir / "summary.md").read_text()
    assert "| precompile | #10 | ok |" in summary
    assert (outdir / "precompile.json").exists() and (outdir / "logs.tar.gz").exists()
