"""Shared test configuration: which backends the shared suite runs on, and the markers.

* ``--backend NAME`` (repeatable) restricts the suite to those backends; by default it
  runs on every backend available here (``convgrad.backends.available()``).
* ``small`` marks cases cheap enough for the emulators; child processes (the Numba
  simulator, the sanitized ``cupy-host``) run ``-m small``.
* ``slow`` marks cases for GPU runs; they are deselected unless ``--run-slow`` is given.

On machines with more than two cores, ``pytest -n auto --dist loadfile`` (pytest-xdist)
spreads the files over the cores; ``loadfile`` keeps each file on one worker, so that a
module-scoped fixture (a batch of child processes, a compile of every kernel) runs once.
(``--dist loadgroup`` does not group anything with pytest 9.2 and xdist 3.8.)  Child pytest
processes started from inside the suite (the Numba simulator, the sanitized ``cupy-host``)
then run without xdist: the workers already use every core.
"""

from __future__ import annotations

import os

import pytest

import convgrad


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", action="append", default=[], help="run the shared suite on this backend only")
    parser.addoption("--run-slow", action="store_true", default=False, help="also run the slow (GPU-sized) cases")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "small: cheap enough for the emulated backends")
    config.addinivalue_line("markers", "slow: GPU-sized; deselected unless --run-slow")
    if config.pluginmanager.hasplugin("xdist"):
        # Read by child `python -m pytest` processes only: this process parsed its options already.
        os.environ["PYTEST_ADDOPTS"] = f"{os.environ.get('PYTEST_ADDOPTS', '')} -n 0".strip()


def backends_under_test(config: pytest.Config) -> list[str]:
    named = config.getoption("--backend")
    if named:
        missing = [n for n in named if n not in convgrad.backends.available()]
        if missing:
            raise pytest.UsageError(f"--backend {', '.join(missing)}: not available on this machine")
        return list(named)
    return convgrad.backends.available()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", backends_under_test(metafunc.config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    kept, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("slow") else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept

