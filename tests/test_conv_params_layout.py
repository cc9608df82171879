"""The parameter struct of kernels/conv_params.cuh and its NumPy mirror agree byte for byte.

A tiny C++ probe includes the header, prints ``offsetof`` and ``sizeof`` of every field and
of the struct, and the test compares them with ``PARAM_DTYPE``.  Kernels receive the struct
as raw bytes, so any disagreement would silently feed them wrong extents or strides.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from convgrad.backends.cupy_planner import PARAM_DTYPE, PARAM_FIELDS
from convgrad.kernel_source import kernel_dir


def _compiler() -> str | None:
    for name in ("g++", "clang++", "c++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _probe_source() -> str:
    lines = [
        "#include <cstddef>",
        "#include <cstdio>",
        '#include "conv_params.cuh"',
        "int main() {",
        '  std::printf("sizeof %zu\\n", sizeof(convgrad::ConvParams));',
        '  std::printf("alignof %zu\\n", alignof(convgrad::ConvParams));',
    ]
    for name, _count in PARAM_FIELDS:
        lines.append(
            f'  std::printf("{name} %zu %zu\\n", offsetof(convgrad::ConvParams, {name}), '
            f"sizeof(((convgrad::ConvParams*)0)->{name}));"
        )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++, clang++) to build the layout probe")
    work = tmp_path_factory.mktemp("conv_params_probe")
    (work / "probe.cpp").write_text(_probe_source())
    exe = work / "probe"
    subprocess.run([cxx, "-std=c++17", f"-I{kernel_dir()}", "probe.cpp", "-o", str(exe)], cwd=work, check=True,
                   capture_output=True, text=True)
    output = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in output.splitlines():
        name, *numbers = line.split()
        result[name] = tuple(int(n) for n in numbers)
    return result


def test_struct_size_matches(probe: dict[str, tuple[int, ...]]) -> None:
    assert probe["sizeof"] == (PARAM_DTYPE.itemsize,)
    assert probe["alignof"] == (PARAM_DTYPE.alignment,)


@pytest.mark.parametrize("name", [name for name, _ in PARAM_FIELDS])
def test_field_offset_and_size_match(probe: dict[str, tuple[int, ...]], name: str) -> None:
    field_dtype, offset = PARAM_DTYPE.fields[name][:2]
    assert probe[name] == (offset, field_dtype.itemsize), f"{name}: C++ (offset, size) {probe[name]}"


def test_every_field_is_int64() -> None:
    """The header declares every field as a 64-bit integer (index_t); so does the mirror."""
    for name, count in PARAM_FIELDS:
        field_dtype = PARAM_DTYPE.fields[name][0]
        assert field_dtype.base == np.dtype("<i8")
        assert field_dtype.itemsize == 8 * count


def test_header_declares_exactly_the_mirrored_fields() -> None:
    """Every field declared in the header is mirrored, in the same order (read from the text)."""
    import re

    text = (kernel_dir() / "conv_params.cuh").read_text()
    body = text[text.index("struct ConvParams {"):]
    body = body[:body.index("};")]
    declared = []
    for line in body.splitlines():
        code = line.split("//")[0].strip()
        if code.startswith("index_t "):
            for item in code[len("index_t "):].rstrip(";").split(","):
                declared.append(re.sub(r"\[.*\]", "", item).strip())
    assert declared == [name for name, _ in PARAM_FIELDS]
