"""The shared suite's small cases on ``cupy-host`` under AddressSanitizer and UBSan.

With them run the ``small`` tiling configurations of tests/test_cupy_host_configurations.py
(the packed-weight tile's every code path), which the suite's small cases do not plan.

The sanitized kernel library needs the sanitizer runtime loaded before Python starts, so
the suite runs in a child process (``run_pytest_sanitized`` sets ``LD_PRELOAD``).  Every
tensor is placed with no slack after it, so one element read or written past any buffer
is reported and fails the child.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from convgrad import cuda_host

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(not cuda_host.compiler_available(), reason="needs g++ >= 11 (or $CXX) to build cupy-host")
def test_shared_suite_small_cases_pass_under_the_sanitizer() -> None:
    result = cuda_host.run_pytest_sanitized(
        [str(TESTS / "test_passes.py"), str(TESTS / "test_cupy_host_configurations.py"), "--backend", "cupy-host",
         "-m", "small", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=str(TESTS.parent), timeout=1200,
    )
    output = result.stdout + result.stderr
    assert "AddressSanitizer" not in output and "runtime error" not in output, output[-4000:]
    assert result.returncode == 0, output[-4000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, output[-2000:]
