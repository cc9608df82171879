"""The ``convgrad`` command: ``info``, ``check``, ``bench``, ``explain``, ``precompile``, ``cache``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when it is the one asked for.  ``--version``
prints the version; without a subcommand the help goes to stderr and the status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "info": ("convgrad.info", "backends, versions and devices on this machine"),
    "check": ("convgrad.check", "run every pass on every available backend against the float64 reference"),
    "bench": ("convgrad.bench.cli", "time every pass on built-in layer suites, beside PyTorch"),
    "explain": ("convgrad.explain", "derive the three passes of a small convolution symbolically"),
    "cache": ("convgrad.cache", "where compiled kernels are kept on disk, their sizes; --clear deletes them"),
    "precompile": ("convgrad.precompiler", "compile ahead of time the GPU kernels a workload needs"),
}


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    from . import __version__

    parser = argparse.ArgumentParser(prog="convgrad", description="convgrad: the three passes of a convolution")
    parser.add_argument("--version", action="version", version=f"convgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = _parser(argv)
    if module is None:
        parser.parse_args(argv)  # --help, --version, or an unknown subcommand: each exits here
        parser.print_help(sys.stderr)  # no subcommand: a usage error, as argparse reports them
        return 2
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)  # type: ignore[union-attr]
