"""The one place that decides where convgrad keeps files it can rebuild (compiled kernels, tuning results)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(part: str) -> Path:
    """``$CONVGRAD_CACHE_DIR/<part>`` if set, else the platform's user cache directory for convgrad
    (platformdirs; ``~/.cache/convgrad`` on Linux) plus ``part``."""
    env = os.environ.get("CONVGRAD_CACHE_DIR")
    if env:
        return Path(env) / part
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".cache" / "convgrad" / part
    return Path(platformdirs.user_cache_dir("convgrad")) / part
