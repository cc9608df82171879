"""The ``convgrad explain`` command: print the derivation, optionally draw one pass, run the backends.

Everything the command needs is checked before any work starts: the optional packages
(SymPy, and matplotlib for ``--plot``), the geometry, the figure's choices and its file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .extras import MissingExtra, require
from .figure import CHOOSER, FIGURES, choose
from .geometry import Geometry, shape_text

# The Python API's argument names -> this command's options, so that errors name what was typed.
OPTION_NAMES = {"input_shape": "--input", "kernel_shape": "--kernel", "stride": "--stride", "padding": "--padding",
                "dilation": "--dilation", "figure": "--figure", "weight": "--weight", "input_cell": "--input-cell",
                "output_cell": "--output-cell", "file": "--plot"}


def _shape(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected extents like 3x3, got {text!r}") from None
    if not 1 <= len(values) <= 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected 1 to 3 non-negative extents like 3x3, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=_shape, default=(3, 3), help="input extents, e.g. 3x3 (default), 5, 3x4x4")
    parser.add_argument("--kernel", type=_shape, default=(2, 2), help="kernel extents, e.g. 2x2 (default)")
    parser.add_argument("--stride", type=_shape, default=(1,), help="stride, one value or one per axis (2 or 2x1)")
    parser.add_argument("--padding", type=_shape, default=(0,), help="symmetric zero padding, one value or one per axis")
    parser.add_argument("--dilation", type=_shape, default=(1,), help="dilation, one value or one per axis")
    parser.add_argument("--then-kernel", type=_shape, metavar="SHAPE",
                        help="add a second layer with this kernel (the first output's extents), down to one value, "
                             "and a squared-error loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random numbers run through the backends")
    figures = parser.add_argument_group("figure (needs matplotlib; 1-D and 2-D convolutions)")
    figures.add_argument("--plot", metavar="FILE",
                         help="also draw one pass to FILE (.png, .svg or .pdf): the cells that meet, paired by colour, "
                              "and the sum they make")
    figures.add_argument("--figure", choices=FIGURES,
                         help="wgrad: the weight gradient of one weight (default); dgrad: the input gradient of one "
                              "input cell, with the flipped kernel; fprop: one output's receptive field")
    figures.add_argument("--weight", type=int, metavar="N", help="wgrad: draw ∂C/∂wN (default 1)")
    figures.add_argument("--input-cell", type=int, metavar="N", help="dgrad: draw ∂C/∂iN (default 1)")
    figures.add_argument("--output-cell", type=int, metavar="N", help="fprop: draw oN (default 1)")


def _figure_choice(args: argparse.Namespace) -> tuple[str, int]:
    """The figure to draw and the number of its weight, input cell or output."""
    given = {figure: getattr(args, CHOOSER[figure]) for figure in FIGURES
             if getattr(args, CHOOSER[figure]) is not None}
    options = [OPTION_NAMES[CHOOSER[figure]] for figure in given]
    if args.plot is None and (given or args.figure):
        chosen = options + (["--figure"] if args.figure else [])
        verb = "chooses" if len(chosen) == 1 else "choose"
        raise ValueError(f"{' and '.join(chosen)} {verb} what --plot draws; add --plot FILE")
    if len(given) > 1:
        raise ValueError(f"{' and '.join(options)} choose different figures; give one of them")
    figure = args.figure or next(iter(given), "wgrad")
    for other in given:
        if other != figure:
            raise ValueError(f"{OPTION_NAMES[CHOOSER[other]]} chooses what the {other} figure draws, "
                             f"but --figure is {figure}")
    return figure, given.get(figure, 1)


def _check(args: argparse.Namespace) -> tuple[Geometry, tuple[str, int] | None]:
    """Every check that can fail, before any work."""
    require("sympy", "convgrad explain")
    if args.plot is not None:
        require("matplotlib", "convgrad explain --plot")
    geometry = Geometry.create(args.input, args.kernel, args.stride, args.padding, args.dilation, names=OPTION_NAMES)
    if args.then_kernel is not None and tuple(args.then_kernel) != geometry.output_shape:
        raise ValueError(f"--then-kernel must be {shape_text(geometry.output_shape)} (the first layer's output) "
                         f"to bring it down to a single value, got {shape_text(args.then_kernel)}")
    figure = _figure_choice(args)
    if args.plot is None:
        return geometry, None
    from .drawing import check_file

    choose(geometry, *figure, names=OPTION_NAMES)
    check_file(args.plot, "--plot")
    return geometry, figure


def run(args: argparse.Namespace) -> int:
    from .chain import chain_text, derive_chain
    from .numeric import check_backends, check_chain_backends, results_text
    from .symbolic import derive
    from .text import explain_text

    try:
        _, figure = _check(args)
    except MissingExtra as error:
        print(error, file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"convgrad explain: {error}", file=sys.stderr)
        return 2
    geometry_args = (args.stride, args.padding, args.dilation)
    chain: Any = derive_chain(args.input, args.kernel, args.then_kernel, *geometry_args) if args.then_kernel else None
    d = chain.first if chain is not None else derive(args.input, args.kernel, *geometry_args)
    print(explain_text(d))
    ok = d.weight_matches_correlation and d.input_matches_full_convolution
    if chain is not None:
        print()
        print(chain_text(chain))
        ok = ok and chain.hidden_matches_chain and chain.weight_matches_chain
    if figure is not None:
        from .drawing import draw, save
        from .figure import figure_data

        data = figure_data(d, *figure, names=OPTION_NAMES, second_layer=chain is not None)
        save(draw(data), args.plot)
        print()
        print(f"Drew {data.title.lower()} ({data.sum_name} = {' + '.join(data.terms) or '0'}) to {args.plot}")
    print()
    results = check_backends(d, args.seed)
    print(results_text("Random numbers through every available backend's three passes (output, grad_input, "
                       "grad_weight):", results))
    ok = ok and all(row["ok"] for row in results)
    if chain is not None:
        chain_results = check_chain_backends(chain, args.seed)
        print(results_text("The two-layer network through every available backend (forward, input gradient of "
                           "layer 2, weight gradients):", chain_results))
        ok = ok and all(row["ok"] for row in chain_results)
    return 0 if ok else 1
