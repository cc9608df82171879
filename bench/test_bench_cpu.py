"""CPU benchmark: convgrad's ``numpy`` backend beside PyTorch CPU (oneDNN), side by side in one run.

float32, batch 8, on ResNet-50's 3x3 layers at 56², 28², 14² and 7² (64, 128, 256, 512
channels), the 1x1 256->64 at 56² and the 7x7 stride-2 stem (3->64 at 224², batch 2); for
each of fprop, dgrad and wgrad.  Each convgrad result is checked against PyTorch's before
it is timed.

At the end of the session the per-layer speed ratios (PyTorch time / convgrad time: above 1
convgrad is faster) and their geometric mean per pass are written, with the BLAS and
thread pools that threadpoolctl sees and the environment variables that steer them, to
``bench/results/cpu-<date>.json`` and ``.md`` (``CONVGRAD_BENCH_RESULTS`` names another
folder).  See bench/README.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

import convgrad  # noqa: E402
from convgrad.bench import CPU_SETTLE_S, Contention, cpu_name, load_average, thread_pools  # noqa: E402
from convgrad.problem import conv_problem  # noqa: E402
from convgrad.testing.tolerance import tolerance  # noqa: E402

PASSES = ("fprop", "dgrad", "wgrad")
IMPLEMENTATIONS = ("convgrad", "torch")
ROUNDS = int(os.environ.get("CONVGRAD_BENCH_ROUNDS", "7"))
RESULTS = Path(os.environ.get("CONVGRAD_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
ENVIRONMENT = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "CONVGRAD_WORKSPACE_MB")

# name -> (batch, C, K, H=W, kernel, stride, padding)
LAYERS = {
    "3x3 64->64 @56": (8, 64, 64, 56, 3, 1, 1),
    "3x3 128->128 @28": (8, 128, 128, 28, 3, 1, 1),
    "3x3 256->256 @14": (8, 256, 256, 14, 3, 1, 1),
    "3x3 512->512 @7": (8, 512, 512, 7, 3, 1, 1),
    "1x1 256->64 @56": (8, 256, 64, 56, 1, 1, 0),
    "7x7/2 3->64 @224": (2, 3, 64, 224, 7, 2, 3),
}


class Data:
    """Inputs of one layer, made once and shared by both implementations and all passes."""

    def __init__(self, name: str) -> None:
        N, C, K, size, kernel, stride, padding = LAYERS[name]
        rng = np.random.default_rng(sorted(LAYERS).index(name))
        self.stride, self.padding = stride, padding
        self.problem = conv_problem("conv2d", 2, (N, C, size, size), (K, C, kernel, kernel), stride, padding, 1, 1,
                                    dtype="float32")
        self.x = rng.standard_normal(self.problem.x_shape[:2] + (size, size), dtype=np.float32)
        self.w = rng.standard_normal((K, C, kernel, kernel), dtype=np.float32)
        P = self.problem.output_size[1]
        self.dy = rng.standard_normal((N, K, P, P), dtype=np.float32)
        self.xt, self.wt, self.dyt = (torch.from_numpy(a) for a in (self.x, self.w, self.dy))

    def call(self, implementation: str, pass_: str):
        s, p = self.stride, self.padding
        if implementation == "convgrad":
            if pass_ == "fprop":
                return lambda: convgrad.conv2d(self.x, self.w, None, s, p, backend="numpy")
            if pass_ == "dgrad":
                return lambda: convgrad.conv2d_input(self.x.shape, self.w, self.dy, s, p, backend="numpy")
            return lambda: convgrad.conv2d_weight(self.x, self.w.shape, self.dy, s, p, backend="numpy")
        if pass_ == "fprop":
            return lambda: torch.nn.functional.conv2d(self.xt, self.wt, None, s, p)
        mask = [pass_ == "dgrad", pass_ == "wgrad", False]
        index = 0 if pass_ == "dgrad" else 1
        return lambda: torch.ops.aten.convolution_backward(self.dyt, self.xt, self.wt, None, [s, s], [p, p], [1, 1],
                                                           False, [0, 0], 1, mask)[index]


_DATA: dict[str, Data] = {}


def _data(name: str) -> Data:
    if name not in _DATA:
        _DATA.clear()  # one layer's arrays at a time
        _DATA[name] = Data(name)
    return _DATA[name]


def _geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


class Results:
    def __init__(self) -> None:
        self.median_s: dict[tuple[str, str, str], float] = {}
        self.min_s: dict[tuple[str, str, str], float] = {}
        self.load_at_start = load_average()
        self.contention = Contention()

    def add(self, layer: str, pass_: str, implementation: str, stats) -> None:
        self.median_s[(layer, pass_, implementation)] = stats.median
        self.min_s[(layer, pass_, implementation)] = stats.min

    def rows(self) -> list[dict]:
        rows = []
        for layer in LAYERS:
            flops = _data_flops(layer)
            for pass_ in PASSES:
                ours, theirs = (self.median_s.get((layer, pass_, i)) for i in IMPLEMENTATIONS)
                if ours is None or theirs is None:
                    continue
                rows.append({
                    "layer": layer, "pass": pass_, "batch": LAYERS[layer][0], "flops": flops,
                    "convgrad_s": ours, "torch_s": theirs,
                    "convgrad_min_s": self.min_s[(layer, pass_, "convgrad")],
                    "torch_min_s": self.min_s[(layer, pass_, "torch")],
                    "convgrad_gflops": flops / ours / 1e9, "torch_gflops": flops / theirs / 1e9,
                    "ratio": theirs / ours,
                    "min_ratio": self.min_s[(layer, pass_, "torch")] / self.min_s[(layer, pass_, "convgrad")],
                })
        return rows

    def write(self) -> None:
        rows = self.rows()
        if not rows:
            return
        geomeans = {p: _geomean([r["ratio"] for r in rows if r["pass"] == p]) for p in PASSES}
        min_geomeans = {p: _geomean([r["min_ratio"] for r in rows if r["pass"] == p]) for p in PASSES}
        versions = {}
        for dist in ("numpy", "torch", "convgrad", "threadpoolctl", "pytest-benchmark"):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        machine = {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "threadpools": thread_pools(),
            "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
            "load_average": {"start": self.load_at_start, "end": load_average()},
            "contention": self.contention.report(),
        }
        today = datetime.date.today().isoformat()
        document = {
            "date": today,
            "ratio_definition": "ratio = PyTorch CPU median time / convgrad (numpy backend) median time; "
                                "above 1 convgrad is faster. min_ratio: the same with the fastest rounds, "
                                "less sensitive to other work on the machine",
            "dtype": "float32",
            "rounds": ROUNDS,
            "machine": machine,
            "versions": versions,
            "geomean_ratio": geomeans,
            "geomean_min_ratio": min_geomeans,
            "layers": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"cpu-{today}.json").write_text(json.dumps(document, indent=1) + "\n")
        (RESULTS / f"cpu-{today}.md").write_text(markdown(document))


def markdown(document: dict) -> str:
    blas = [p for p in document["machine"]["threadpools"] or [] if p.get("user_api") == "blas"]
    blas_text = ", ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, "
                          f"{p.get('num_threads')} threads)" for p in blas) or "unknown"
    env = ", ".join(f"{k}={v}" for k, v in document["machine"]["environment"].items() if v) or "none set"
    load = document["machine"]["load_average"]
    others = document["machine"]["contention"]["other_processes_cpus"]
    lines = [
        f"Measured {document['date']} on {document['machine']['cpu']} ({document['machine']['logical_cpus']} logical "
        f"CPUs); NumPy {document['versions']['numpy']} with {blas_text}; PyTorch {document['versions']['torch']} "
        f"({document['machine']['torch_threads']} threads); BLAS/OpenMP environment: {env}.",
        f"float32, {document['rounds']} rounds each; times and GFLOP/s are medians. Ratio = PyTorch time / convgrad "
        f"time (above 1: convgrad faster), of the medians and of the fastest rounds. Load average (1, 5, 15 min) "
        f"at the start {load['start']}, at the end {load['end']}; other processes kept "
        f"{'an unknown number of' if others is None else f'{others:.2f}'} CPUs busy on average during the run.",
        "",
        "| layer | batch | pass | convgrad ms | PyTorch ms | convgrad GFLOP/s | PyTorch GFLOP/s | ratio | ratio of minimums |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in document["layers"]:
        lines.append(f"| {r['layer']} | {r['batch']} | {r['pass']} | {r['convgrad_s'] * 1e3:.2f} | "
                     f"{r['torch_s'] * 1e3:.2f} | {r['convgrad_gflops']:.1f} | {r['torch_gflops']:.1f} | "
                     f"{r['ratio']:.2f} | {r['min_ratio']:.2f} |")
    for pass_, value in document["geomean_ratio"].items():
        if value is not None:
            lines.append(f"| **geometric mean** | | {pass_} | | | | | **{value:.2f}** | "
                         f"**{document['geomean_min_ratio'][pass_]:.2f}** |")
    return "\n".join(lines) + "\n"


def _data_flops(layer: str) -> int:
    N, C, K, size, kernel, stride, padding = LAYERS[layer]
    P = (size + 2 * padding - kernel) // stride + 1
    return 2 * N * K * P * P * C * kernel * kernel


@pytest.fixture(scope="session")
def results():
    collected = Results()
    yield collected
    collected.write()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_cpu(benchmark, results, layer, pass_, implementation):
    data = _data(layer)
    call = data.call(implementation, pass_)
    if implementation == "convgrad":
        expected = data.call("torch", pass_)().numpy().astype(np.float64)
        reduction = data.problem.gemm_reduction[pass_]
        rtol, atol = tolerance("float32", reduction)
        np.testing.assert_allclose(call(), expected, rtol=2 * rtol, atol=2 * atol)
    # The other library's worker threads spin for about 0.1 s after its last call (here or in
    # the check above) and would slow this one down; see convgrad.bench.CPU_SETTLE_S.
    time.sleep(CPU_SETTLE_S)
    benchmark.group = f"{layer} {pass_}"
    benchmark.extra_info.update(layer=layer, pass_=pass_, flops=_data_flops(layer))
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        results.add(layer, pass_, implementation, benchmark.stats.stats)
