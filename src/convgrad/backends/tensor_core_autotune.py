"""Autotuning of the tensor-core configurations: time the candidates once, remember the winner.

With ``CONVGRAD_AUTOTUNE=1`` (or ``convgrad.config(autotune=True)``) the ``cupy`` backend times
every tensor-core configuration of a pass on the first use of a problem on a GPU (its own
arrays, CUDA events, the median of a few runs after a warm-up) and runs the fastest; the
winner is stored per device and problem in ``<user cache dir>/convgrad/autotune/`` (or
``$CONVGRAD_CACHE_DIR/autotune``), one JSON file per device, so later processes skip the
timing.  Without a GPU (``cupy-host``) only the heuristic of
:class:`~convgrad.backends.tensor_core_planner.TensorCorePlanner` runs.

The cache and the choice are plain Python (:class:`AutotuneCache`, :class:`Autotuner`) and are
tested on the CPU with a stand-in for the timer.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

from ..problem import ConvProblem
from ..user_cache import user_cache_dir
from ..tensor_core_catalog import TcConfig
from .tensor_core_planner import DeviceModel, channels_fastest

#: Bumped when the meaning of a cached entry changes (kernels, configurations), so that old
#: winners are not reused.
CACHE_VERSION = 1


def cache_root() -> Path:
    """Directory of the tuning results: ``autotune`` in convgrad's user cache directory."""
    return user_cache_dir("autotune")


def device_key(device: DeviceModel) -> str:
    """What identifies a GPU for the cache: its name, compute capability and SM count."""
    return f"{device.name}|sm_{device.capability}|{device.sm_count}sm"


def problem_key(problem: ConvProblem, pass_: str) -> str:
    """What identifies a problem for the cache: its geometry and dtype (the case name), the
    numerics options, and the layout facts the kernels branch on."""
    layout = "".join(
        "c" if channels_fastest(strides, extents) else "s"
        for strides, extents in ((problem.x_strides, problem.input_size), (problem.y_strides, problem.output_size))
    )
    return (f"{problem.name(pass_)}|tf32={int(problem.allow_tf32)}|det={int(problem.deterministic)}"
            f"|layout={layout}|v{CACHE_VERSION}")


class AutotuneCache:
    """Winning configuration names per device and problem, one JSON file per device.

    Writes go through a temporary file and an atomic rename, and merge with what is on disk
    at that moment, so concurrent processes lose no entries but their own (last writer wins
    for one key).  Thread-safe.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()
        self._lock = threading.Lock()
        self._loaded: dict[str, dict[str, str]] = {}

    def path(self, device: str) -> Path:
        return self.root / (re.sub(r"[^A-Za-z0-9_.-]+", "_", device) + ".json")

    def _read(self, device: str) -> dict[str, str]:
        try:
            data = json.loads(self.path(device).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, device: str, problem: str) -> str | None:
        """The configuration name stored for ``problem`` on ``device``, or None."""
        with self._lock:
            if device not in self._loaded:
                self._loaded[device] = self._read(device)
            return self._loaded[device].get(problem)

    def put(self, device: str, problem: str, config: str) -> None:
        """Store ``config`` as the winner for ``problem`` on ``device``."""
        with self._lock:
            entries = self._read(device)
            entries[problem] = config
            self.root.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=".autotune-", dir=self.root)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as f:
                    json.dump(entries, f, indent=1, sort_keys=True)
                os.replace(temporary, self.path(device))
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            self._loaded[device] = entries


class Autotuner:
    """Chooses among candidate configurations by timing them, once per device and problem.

    Parameters
    ----------
    cache : AutotuneCache, optional
        Where winners are kept; default the user cache directory.
    """

    def __init__(self, cache: AutotuneCache | None = None) -> None:
        self.cache = cache or AutotuneCache()

    def choose(self, device: DeviceModel, problem: ConvProblem, pass_: str, candidates: Sequence[TcConfig],
               measure: Callable[[TcConfig], float]) -> TcConfig:
        """The cached winner among ``candidates``, else the one ``measure`` (seconds) finds fastest.

        ``measure`` runs only on a cache miss (or when the cached name is no longer a candidate).
        """
        if not candidates:
            raise ValueError("autotuning needs at least one candidate configuration")
        dkey, pkey = device_key(device), problem_key(problem, pass_)
        cached = self.cache.get(dkey, pkey)
        for config in candidates:
            if config.name == cached:
                return config
        times = [(measure(config), index) for index, config in enumerate(candidates)]
        best = candidates[min(times)[1]]
        self.cache.put(dkey, pkey, best.name)
        return best
