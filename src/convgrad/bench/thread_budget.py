"""``convgrad bench --thread-budget``: does convgrad's CPU work slow the PyTorch operators after it?

Inside a training step, convgrad's convolutions alternate with PyTorch's own operators.  If
convgrad left threads spinning on the cores when it returned (NumPy's OpenBLAS does so for
about 0.1 s), the next PyTorch operator would run slowly.  This measures it directly: a
PyTorch operator on a ResNet-like activation is timed right after a convgrad convolution
(one of its three passes, in turn), and right after PyTorch's own convolution of the same
shape, which does the same work on PyTorch's threads.  The ratio of the two medians is the
slow-down convgrad causes; 1 means none, and the target is at most 1.2.

It runs on the CPU, with ``convgrad.torch``'s thread budget on and off.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

#: The activation the operators run on: (batch, channels, size, size), ResNet-18's first stage at 128x128.
ACTIVATION = (4, 64, 32, 32)
BUDGET_TARGET = 1.2

THREAD_BUDGET_DEFINITION = (
    "slowdown = median time of a PyTorch operator called right after a convgrad convolution / median time of the "
    "same operator called right after PyTorch's own convolution of the same shape; 1 means convgrad leaves the "
    f"cores as it found them; target at most {BUDGET_TARGET}"
)


def _elapsed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_thread_budget(enabled: bool = True, repeats: int = 30, warmup: int = 5,
                          activation: tuple[int, int, int, int] = ACTIVATION) -> dict[str, Any]:
    """Time each operator after convgrad's and after PyTorch's convolution; medians and their ratio.

    Returns ``{"thread_budget": enabled, "activation": ..., "repeats": ..., "operators": {name:
    {"after_torch_s", "after_convgrad_s", "slowdown", and the same of the fastest repeats:
    "after_torch_min_s", "after_convgrad_min_s", "slowdown_min"}}}``.
    """
    import torch

    import convgrad.torch as convgrad_torch

    generator = torch.Generator().manual_seed(0)
    N, C, H, W = activation
    x = torch.randn(N, C, H, W, generator=generator)
    w = torch.randn(C, C, 3, 3, generator=generator)
    dy = torch.randn(N, C, H, W, generator=generator)
    mean, var = torch.zeros(C), torch.ones(C)
    operators: dict[str, Callable[[], Any]] = {
        "batch_norm": lambda: torch.batch_norm(x, None, None, mean, var, True, 0.1, 1e-5, False),
        "conv2d": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
        "relu": lambda: torch.relu(x),
    }
    convgrad_passes = [
        lambda: convgrad_torch.conv2d(x, w, None, 1, 1),
        lambda: convgrad_torch.conv2d_input(x.shape, w, dy, 1, 1),
        lambda: convgrad_torch.conv2d_weight(x, w.shape, dy, 1, 1),
    ]
    torch_passes = [
        lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
        lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, 1, 1),
        lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, 1, 1),
    ]
    results: dict[str, dict[str, float]] = {}
    with convgrad_torch._thread_budget(enabled):
        for name, operator in operators.items():
            after: dict[str, list[float]] = {"torch": [], "convgrad": []}
            for i in range(warmup + repeats):
                # Interleaved, so that other work on the machine falls on both sides alike.
                for library, passes in (("torch", torch_passes), ("convgrad", convgrad_passes)):
                    passes[i % 3]()
                    elapsed = _elapsed(operator)
                    if i >= warmup:
                        after[library].append(elapsed)
            after_torch, after_convgrad = statistics.median(after["torch"]), statistics.median(after["convgrad"])
            # The fastest repeats too: on a loaded machine a thread woken late dominates the medians.
            fastest_torch, fastest_convgrad = min(after["torch"]), min(after["convgrad"])
            results[name] = {"after_torch_s": after_torch, "after_convgrad_s": after_convgrad,
                             "slowdown": after_convgrad / after_torch, "after_torch_min_s": fastest_torch,
                             "after_convgrad_min_s": fastest_convgrad, "slowdown_min": fastest_convgrad / fastest_torch}
    return {"thread_budget": enabled, "activation": list(activation), "repeats": repeats, "operators": results}
