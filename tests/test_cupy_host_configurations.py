"""Every implicit-GEMM configuration the ``cupy`` planner can choose runs a case of the shared suite.

A configuration is a tile (``kernel_catalog.gemm_tiles``) with, for fprop and dgrad, one or
several split-K slices and the reduction in channel chunks or flattened (tap, channel)
pairs (packed-weight tiles only), and a channel-first or channels-last activation (the
interleaved, blocked and vector staging); for wgrad, each of the tile's stagings with a
direct store, a split-K workspace or (``deterministic=False``) atomics.  The curated cases
reach only some of them, so each configuration is forced through the planner's ``tiles=``
and ``splits=`` on a curated case that allows it, run on ``cupy-host``, checked to have
planned what was asked and compared exactly with the float64 reference (integer inputs).

float32 runs every configuration; the other dtypes' instantiations share the same template
code and run one case per tile and pass, so that every instantiation runs at least once.
"""

from __future__ import annotations

import numpy as np
import pytest

import convgrad
from convgrad import arrays
from convgrad.backends.cupy_backend import CupyHostBackend
from convgrad.backends.cupy_planner import EPILOGUE_ATOMIC, EPILOGUE_WORKSPACE, Planner
from convgrad.kernel_catalog import DTYPES, gemm_tiles, wgrad_stagings
from convgrad.testing import assert_close, reference_forward, reference_grad_input, reference_grad_weight
from convgrad.testing.cases import CASES, make_array, poisoned

pytestmark = pytest.mark.skipif(not CupyHostBackend().available(), reason="no C++ compiler for cupy-host")


class _Recording(CupyHostBackend):
    """cupy-host that keeps the plans it runs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.plans = []

    def _execute(self, plan, tensors, outputs) -> None:
        self.plans.append(plan)
        super()._execute(plan, tensors, outputs)


def _case(*, channels_last: bool, small_channels: bool):
    """A curated 2-D, ungrouped, stride-1, 3x3 case: channels below BK (8) or not, in either layout."""
    for case in CASES:
        if not (case.ndim == 2 and case.groups == 1 and case.kernel == (3, 3) and case.stride == 1
                and case.batch is not None):
            continue
        if case.channels_last != channels_last or case.sliced or case.slow:
            continue
        if (max(case.C, case.K) < 8) == small_channels:
            return case
    raise LookupError(f"no curated case with channels_last={channels_last}, small_channels={small_channels}")


def _marks(tile) -> list:
    """The float32 configurations of the packed-weight 64-wide tile also run under the
    sanitizer (``small``; tests/test_cupy_host_sanitized.py): they reach every code path the
    larger tiles have (packed weight, flattened reduction, split-K, both wgrad stagings, the
    vector loads), whereas the shared suite's small cases plan the small tile."""
    return [pytest.mark.small] if tile.packed_b and tile.BM == 64 and tile.threads == 64 else []


def _configurations():
    params = []
    for dtype in DTYPES:
        for tile in gemm_tiles(dtype):
            tile_id = f"{dtype}-{tile.BM}x{tile.BN}"
            if dtype != "float32":
                for pass_ in ("fprop", "dgrad", "wgrad"):
                    params.append(pytest.param(dtype, tile, pass_, 1, tile.packed_b, False, True, True,
                                               id=f"{tile_id}-{pass_}"))
                continue
            for pass_ in ("fprop", "dgrad"):
                for splits in (1, 3):
                    packs = (False, True) if tile.packed_b else (False,)
                    for packed in packs:
                        layouts = (False, True) if not packed else (False,)
                        for channels_last in layouts:
                            params.append(pytest.param(
                                dtype, tile, pass_, splits, packed, channels_last, True, True, marks=_marks(tile),
                                id=f"{tile_id}-{pass_}-s{splits}-{'packed' if packed else 'chunks'}-"
                                   f"{'nhwc' if channels_last else 'nchw'}"))
            for kfast in wgrad_stagings(tile):
                for splits, deterministic in ((1, True), (3, True), (3, False)):
                    epilogue = "store" if splits == 1 else "workspace" if deterministic else "atomic"
                    params.append(pytest.param(dtype, tile, "wgrad", splits, False, not kfast, kfast, deterministic,
                                               marks=_marks(tile),
                                               id=f"{tile_id}-wgrad-{'kfast' if kfast else 'cfast'}-{epilogue}"))
    return params


@pytest.mark.parametrize(("dtype", "tile", "pass_", "splits", "packed", "channels_last", "kfast", "deterministic"),
                         _configurations())
def test_configuration_runs_a_curated_case(dtype, tile, pass_, splits, packed, channels_last, kfast,
                                           deterministic) -> None:
    case = _case(channels_last=channels_last, small_channels=packed)
    backend = _Recording(planner=Planner(tiles=(tile,), splits=splits))
    problem = case.problem(dtype).with_options(deterministic=deterministic)
    rng = np.random.default_rng(5)
    x = make_array(rng, case.x_shape(), dtype)
    w = make_array(rng, case.w_shape(), dtype)
    dy = make_array(rng, case.y_shape(), dtype)
    geometry = case.kwargs()
    logical = lambda a, role: arrays.logical_view(a, "numpy", role, problem)  # noqa: E731
    with convgrad.config(deterministic=deterministic):
        if pass_ == "fprop":
            out = convgrad.conv2d(x, w, out=poisoned(case.y_shape(), dtype), backend=backend, **geometry)
            expected = reference_forward(logical(x, "x"), logical(w, "w"), problem)
            result = logical(out, "y")
        elif pass_ == "dgrad":
            out = convgrad.conv2d_input(case.x_shape(), w, dy, out=poisoned(case.x_shape(), dtype), backend=backend,
                                        **geometry)
            expected = reference_grad_input(logical(dy, "y"), logical(w, "w"), problem)
            result = logical(out, "x")
        else:
            out = convgrad.conv2d_weight(x, case.w_shape(), dy, out=poisoned(case.w_shape(), dtype), backend=backend,
                                         **geometry)
            expected = reference_grad_weight(logical(x, "x"), logical(dy, "y"), problem)
            result = logical(out, "w")
    # The planner planned exactly the configuration asked for.
    (plan,) = backend.plans
    assert plan.tile == tile and (plan.splits > 1) == (splits > 1)
    params = plan.main.params
    if pass_ == "wgrad":
        assert plan.main.kernel.endswith(f", {str(kfast).lower()}>")
        if splits > 1:
            assert int(params["epilogue"]) == (EPILOGUE_WORKSPACE if deterministic else EPILOGUE_ATOMIC)
    else:
        assert int(params["red_packed"]) == int(packed)
        assert int(params["a_blocked"]) == int(channels_last)
    assert_close(result, expected, dtype, reduction=problem.gemm_reduction[pass_], exact=True,
                 name=f"{case.name(pass_, dtype)} on {tile}")
