"""The ``convgrad`` command itself: --version, a bare call, and ``convgrad cache``."""

from __future__ import annotations

from pathlib import Path

import pytest

import convgrad
from convgrad.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"convgrad {convgrad.__version__}\n"
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as file:
        assert tomllib.load(file)["project"]["version"] == convgrad.__version__


def test_bare_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: convgrad")
    for name in SUBCOMMANDS:
        assert name in captured.err


@pytest.fixture
def cache_dirs(tmp_path, monkeypatch):
    """Every cache pointed at a temporary directory, each holding one file of known size."""
    monkeypatch.setenv("CONVGRAD_CACHE_DIR", str(tmp_path / "convgrad"))
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cupy"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    files = {
        "cupy-host": tmp_path / "convgrad" / "cuda_host" / "ab" / "libkernels.so",
        "autotune": tmp_path / "convgrad" / "autotune" / "v1" / "device.json",
        "cupy": tmp_path / "cupy" / "deadbeef.cubin",
        "numba": tmp_path / "numba" / "site-packages_convgrad_backends" / "numpy_backend.f-10.py311.nbc",
    }
    other_numba = tmp_path / "numba" / "site-packages_otherlib" / "other.g-3.py311.nbc"
    for path in (*files.values(), other_numba):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 3 * 2**20)
    return files, other_numba


def test_cache_lists_paths_and_sizes(cache_dirs, capsys) -> None:
    files, _ = cache_dirs
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"cupy-host  {files['cupy-host'].parents[1]}  3.0 MB in 1 files" in out
    assert f"autotune   {files['autotune'].parents[1]}  3.0 MB in 1 files" in out
    assert f"cupy       {files['cupy'].parent}  3.0 MB in 1 files (shared with every CuPy program)" in out
    # Only convgrad's files count in Numba's shared directory.
    assert f"numba      {files['numba'].parents[1]}  3.0 MB in 1 files" in out


def test_cache_clear_deletes_convgrad_caches_but_not_cupys_unless_asked(cache_dirs, capsys) -> None:
    files, other_numba = cache_dirs
    assert main(["cache", "--clear"]) == 0
    assert "cupy-host" in capsys.readouterr().out
    assert not files["cupy-host"].exists() and not files["numba"].exists() and not files["autotune"].exists()
    assert files["cupy"].exists() and other_numba.exists()
    assert main(["cache", "--clear", "--include-cupy"]) == 0
    assert not files["cupy"].exists() and other_numba.exists()
    assert main(["cache", "--include-cupy"]) == 2
