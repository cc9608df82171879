"""Options that change numerics or resources: per call, else ``config(...)``, else environment.

==================  ==========================  =======  ==================================================
option              environment variable        default  effect
==================  ==========================  =======  ==================================================
``deterministic``   ``CONVGRAD_DETERMINISTIC``  True     dgrad/wgrad without floating-point atomics, results
                                                         bit-identical run to run; False lets ``cupy`` add
                                                         split-K slices with atomics
``allow_tf32``      ``CONVGRAD_ALLOW_TF32``     False    float32 on the ``cupy`` tensor cores in TF32; other
                                                         backends compute float32 exactly either way
``autotune``        ``CONVGRAD_AUTOTUNE``       False    ``cupy`` times the tensor-core tile configurations on
                                                         a problem's first use and caches the fastest
``workspace_mb``    ``CONVGRAD_WORKSPACE_MB``   256      the ``numpy`` backend's cap on temporary memory, MiB
==================  ==========================  =======  ==================================================

``deterministic`` and ``allow_tf32`` can also be given per call; ``autotune`` and
``workspace_mb`` only through ``config`` or the environment.  Booleans in the environment
are ``1/0``, ``true/false``, ``yes/no`` or ``on/off``.  The README's settings table lists
these with every other environment variable convgrad reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

DEFAULTS: dict[str, Any] = {"deterministic": True, "allow_tf32": False, "autotune": False, "workspace_mb": 256}
_ENV = {name: f"CONVGRAD_{name.upper()}" for name in DEFAULTS}
_overrides: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("convgrad_config", default={})


def _parse(name: str, text: str) -> Any:
    if isinstance(DEFAULTS[name], bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{_ENV[name]} must be 0 or 1, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{_ENV[name]} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{_ENV[name]} must be a positive integer, got {text!r}")
    return value


def get(name: str, value: Any = None) -> Any:
    """Resolve option ``name``: ``value`` if not None, else ``config``, else environment, else default."""
    if value is not None:
        return value
    overrides = _overrides.get()
    if name in overrides:
        return overrides[name]
    text = os.environ.get(_ENV[name])
    if text:
        return _parse(name, text)
    return DEFAULTS[name]


@contextlib.contextmanager
def config(**options: Any) -> Iterator[None]:
    """Set options for the calls made inside the ``with`` block.

    Examples
    --------
    >>> with convgrad.config(deterministic=False, workspace_mb=64):
    ...     y = convgrad.conv2d(x, w)
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"config: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    for name, value in options.items():
        if isinstance(DEFAULTS[name], bool) and not isinstance(value, bool):
            raise TypeError(f"config: {name} must be True or False, got {value!r}")
        if not isinstance(DEFAULTS[name], bool) and (not isinstance(value, int) or value < 1):
            raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
    token = _overrides.set({**_overrides.get(), **options})
    try:
        yield
    finally:
        _overrides.reset(token)
