"""The optional packages ``convgrad explain`` needs, and the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "explain"
# import name -> the name people know the package by
PACKAGES = {"sympy": "SymPy", "matplotlib": "matplotlib"}


class MissingExtra(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` saying that ``feature`` needs it.

    ``feature`` is what the user asked for, e.g. ``"convgrad explain --plot"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f'{feature} needs {PACKAGES.get(module, module)}: pip install "convgrad[{EXTRA}]" '
                           f'(in a source checkout: pip install ".[{EXTRA}]")', name=module) from None
