"""Optional features name the extra to install, before any work, when their package is missing.

Each test hides the package (``sys.modules[name] = None`` makes its import fail) and checks the
message and that nothing ran.  The extras themselves are checked against pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _no_work(*args, **kwargs):
    raise AssertionError("work started although a required package is missing")


def test_digits_example_without_scikit_learn_names_the_extra(monkeypatch, capsys) -> None:
    from convgrad.examples import digits

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setattr(digits, "build_model", _no_work)
    monkeypatch.setattr(digits, "load_data", _no_work)
    with pytest.raises(SystemExit) as exit_info:
        digits.main(["--epochs", "1", "--no-progress"])
    assert exit_info.value.code == (
        'error: the digits example loads its data with scikit-learn, which is not installed; '
        'install it with: pip install "convgrad[examples]"'
    )
    assert "test accuracy" not in capsys.readouterr().out
    with pytest.raises(ModuleNotFoundError, match=r'pip install "convgrad\[examples\]"'):
        digits.train(epochs=1, progress=False)


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    """Package names without versions or extras: ``"numba>=0.60"`` -> ``"numba"``."""
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_examples_extra_holds_scikit_learn() -> None:
    assert "scikit-learn" in _names(_extras()["examples"])


def test_test_extra_installs_every_optional_feature() -> None:
    """``pip install -e ".[test]"`` must run every test: it holds every extra but the GPU wheels."""
    extras = _extras()
    test = _names(extras["test"])
    for name, requirements in extras.items():
        if name in ("test", "cuda12", "cuda13"):
            continue
        missing = _names(requirements) - test
        assert not missing, f"the test extra lacks {sorted(missing)} from the {name!r} extra"
