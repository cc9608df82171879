"""Bit-identical dgrad and wgrad run to run, on every backend (DESIGN §5: deterministic by default).

The problems are large enough that the weight gradient splits its reduction (split-K) on the
GPU backends, where a floating-point atomic would make the sum depend on the order blocks
finish in; the default path adds the slices in a fixed order instead.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad.problem import conv_problem
from convgrad.testing.cases import numpy_dtype

N, C, K, H, W = 2, 16, 16, 28, 28


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("groups, stride", [(1, 1), (1, 2), (4, 1), (16, 2)],
                         ids=["dense", "dense_s2", "grouped", "depthwise_s2"])
def test_dgrad_and_wgrad_are_bit_identical_run_to_run(backend_name, dtype, groups, stride):
    problem = conv_problem("conv2d", 2, (N, C, H, W), (K, C // groups, 3, 3), stride, 1, 1, groups, dtype=dtype)
    reason = convgrad.backends.get(backend_name).unsupported(problem)
    if reason:
        pytest.skip(f"{backend_name} does not support this problem: {reason}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(numpy_dtype(dtype))
    w = rng.standard_normal((K, C // groups, 3, 3)).astype(numpy_dtype(dtype))
    dy = rng.standard_normal((N, K, *problem.output_size[1:])).astype(numpy_dtype(dtype))
    runs = []
    for _ in range(2):
        dx = convgrad.conv2d_input(x.shape, w, dy, stride, 1, 1, groups, backend=backend_name)
        dw = convgrad.conv2d_weight(x, w.shape, dy, stride, 1, 1, groups, backend=backend_name)
        runs.append((np.asarray(dx).tobytes(), np.asarray(dw).tobytes()))
    assert runs[0][0] == runs[1][0], "dgrad differs between two runs"
    assert runs[0][1] == runs[1][1], "wgrad differs between two runs"
