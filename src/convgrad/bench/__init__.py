"""``convgrad bench``: time the three passes on built-in layer suites, beside PyTorch."""

from .runner import (CPU_SETTLE_S, SUITES, Contention, _cpu_name, _load_average, _resolve_backends, _threadpools,
                     add_arguments, run)

__all__ = ["CPU_SETTLE_S", "SUITES", "Contention", "add_arguments", "run"]
