"""``convgrad explain --plot``: draw a :class:`~convgrad.explain.figure.FigureData` with matplotlib.

matplotlib is imported only when a figure is drawn, and only its Agg canvas is used (no
pyplot, no window, no global state), so drawing works on a machine without a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .extras import require
from .figure import GAP, PADDING, FigureData, Grid, choose, figure_data
from .geometry import API_NAMES, Geometry

FORMATS = (".png", ".svg", ".pdf")
CELL = 0.46  # inches per grid cell
BETWEEN = 0.6  # inches between two grids, where ⋆ and = stand
MARGIN = 0.3  # inches
MIN_WIDTH = 7.0  # inches: room for the title and the sum
DPI = 90  # small, readable PNGs
ARC_HEIGHT = 0.4  # inches that the lines between one-row grids rise


def check_file(file: str | Path, name: str = "file") -> Path:
    """The file a figure goes to: a .png, .svg or .pdf in a folder that exists."""
    path = Path(file)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{name} must end in {', '.join(FORMATS)}, got {str(file)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"{name}: the folder {str(path.parent)!r} does not exist")
    return path


def _darker(colour: Any, factor: float = 0.8) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(factor * v for v in to_rgb(colour))  # type: ignore[return-value]


def _draw_grid(ax: Any, grid: Grid, colours: Mapping[tuple[int, int], Any],
               padding_products: set[tuple[int, int]]) -> None:
    from matplotlib.patches import Rectangle

    rows, columns = grid.shape
    ax.set_xlim(0, columns)
    ax.set_ylim(rows, 0)  # row 0 at the top, as the matrices are printed
    ax.set_axis_off()
    if rows == 1:  # the arcs between one-row grids run above them, so the title goes below
        ax.text(columns / 2, 1.25, grid.title, ha="center", va="top", fontsize=10)
    else:
        ax.set_title(grid.title, fontsize=10)
    for (row, column), label in grid.labels.items():
        kind = grid.kinds[(row, column)]
        face, edge, text_colour, hatch, width, style = "white", "#888888", "black", None, 0.8, "-"
        if kind == PADDING:
            face, edge, text_colour, hatch = "#eeeeee", "#aaaaaa", "#888888", "///"
        elif kind == GAP:
            face, text_colour = "#f4f4f4", "#aaaaaa"
        if (row, column) in colours:
            face, edge, width = (*colours[(row, column)], 0.35), colours[(row, column)], 2.0
        if (row, column) in padding_products:
            edge, width, style = "#666666", 1.6, "--"
        if (row, column) == grid.chosen:
            face, edge, width = "#ffd54f", "black", 2.4
        ax.add_patch(Rectangle((column, row), 1, 1, facecolor=face, edgecolor=edge, hatch=hatch, linewidth=width,
                               linestyle=style, clip_on=False, zorder=2 if width > 1 else 1))
        ax.text(column + 0.5, row + 0.5, label, ha="center", va="center", fontsize=10, color=text_colour, zorder=3)
    if grid.window is not None:
        (r0, c0), (r1, c1) = grid.window
        ax.add_patch(Rectangle((c0 - 0.06, r0 - 0.06), c1 - c0 + 1.12, r1 - r0 + 1.12, fill=False, edgecolor="black",
                               linewidth=1.8, linestyle="--", clip_on=False, zorder=4))


def _centre(ax: Any, grid: Grid, cell: tuple[int, int], width: float, height: float) -> tuple[float, float]:
    """The centre of ``cell`` of the grid drawn in ``ax``, in inches from the figure's corner."""
    box = ax.get_position()
    return (box.x0 * width + (cell[1] + 0.5) * CELL, box.y0 * height + (grid.shape[0] - cell[0] - 0.5) * CELL)


def _any_overlap(segments: Sequence[tuple[tuple[float, float], tuple[float, float]]]) -> bool:
    """Whether two of the segments lie along one line and share a stretch of it."""
    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    for k, (p, q) in enumerate(segments):
        for r, t in segments[k + 1:]:
            if abs(cross(p, q, r)) < 1e-9 and abs(cross(p, q, t)) < 1e-9:
                direction = (q[0] - p[0], q[1] - p[1])
                position = [(a[0] - p[0]) * direction[0] + (a[1] - p[1]) * direction[1] for a in (p, q, r, t)]
                if min(max(position[:2]), max(position[2:])) > max(min(position[:2]), min(position[2:])):
                    return True
    return False


def draw(data: FigureData) -> Any:
    """A matplotlib ``Figure`` (on an Agg canvas) of ``data``: three grids, the pairs, the sum."""
    require("matplotlib", "convgrad explain --plot")
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import ConnectionPatch
    from matplotlib.text import Annotation

    # tab10 without its grey, which would read as padding
    palette = [_darker(c, 0.95) for k, c in enumerate(matplotlib.colormaps["tab10"].colors) if k != 7]
    real = [k for k, pair in enumerate(data.pairs) if not pair.padding]
    colour_of = {k: palette[n % len(palette)] for n, k in enumerate(real)}
    widths = [grid.shape[1] * CELL for grid in data.grids]
    heights = [grid.shape[0] * CELL for grid in data.grids]
    content = sum(widths) + BETWEEN * (len(widths) - 1)
    one_row = all(grid.shape[0] == 1 for grid in data.grids)
    top, panel = 1.05 + (ARC_HEIGHT if one_row else 0), max(heights)
    bottom = 0.55 + 0.24 * len(data.notes) + 0.15 + (0.3 if one_row else 0)
    width, height = max(content + 2 * MARGIN, MIN_WIDTH), top + panel + bottom
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    inches = figure.dpi_scale_trans

    left_colours = {data.pairs[k].left: colour_of[k] for k in real}
    right_colours = {data.pairs[k].right: colour_of[k] for k in real}
    padding_left = {pair.left for pair in data.pairs if pair.padding}
    padding_right = {pair.right for pair in data.pairs if pair.padding}
    axes = []
    x = (width - content) / 2
    for k, (grid, w, h) in enumerate(zip(data.grids, widths, heights)):
        ax = figure.add_axes((x / width, (bottom + (panel - h) / 2) / height, w / width, h / height))
        colours = left_colours if k == 0 else right_colours if k == 1 else {}
        _draw_grid(ax, grid, colours, padding_left if k == 0 else padding_right if k == 1 else set())
        axes.append(ax)
        if k < len(data.operators):
            figure.text((x + w + BETWEEN / 2) / width, (bottom + panel / 2) / height, data.operators[k],
                        ha="center", va="center", fontsize=22, zorder=4)
        x += w + BETWEEN

    # Products with the padding are 0 and get no line, only dashed outlines: lines to every
    # padding cell would hide the pairs that count.
    segments = {k: (_centre(axes[0], data.grids[0], data.pairs[k].left, width, height),
                    _centre(axes[1], data.grids[1], data.pairs[k].right, width, height)) for k in real}
    arcs = _any_overlap(list(segments.values()))
    for k, (start, end) in segments.items():
        pair = data.pairs[k]
        # Where straight lines would run along each other, every line becomes an arc rising
        # ARC_HEIGHT (arc3's rad is relative to the length).
        bend = 2 * ARC_HEIGHT / math.dist(start, end) if arcs else 0.0
        figure.add_artist(ConnectionPatch(
            xyA=(pair.left[1] + 0.5, pair.left[0] + 0.5), coordsA=axes[0].transData,
            xyB=(pair.right[1] + 0.5, pair.right[0] + 0.5), coordsB=axes[1].transData,
            connectionstyle=f"arc3,rad={-bend:.3f}",
            color=colour_of[k], linewidth=1.5, alpha=0.85, shrinkA=11, shrinkB=11, zorder=5))

    figure.text(MARGIN / width, 1 - 0.32 / height, data.title, fontsize=13, fontweight="bold", va="center")
    figure.text(MARGIN / width, 1 - 0.6 / height, data.subtitle, fontsize=9.5, color="#444444", va="center")

    # The sum underneath, each term in the colour of its pair: every piece placed right
    # after the previous one, so no width needs guessing.
    piece: Any = figure.text(MARGIN, 0.15 + 0.24 * len(data.notes) + 0.12, f"{data.sum_name} = ",
                             transform=inches, fontsize=12, va="baseline")
    pieces = [(" + " if k else "") for k in range(len(data.terms))]
    for k, (term, pair_index) in enumerate(zip(data.terms, data.term_pairs)):
        for text, colour in ((pieces[k], "black"), (term, colour_of[pair_index])):
            if text:
                piece = figure.add_artist(Annotation(text, xy=(1, 0), xycoords=piece, va="bottom", fontsize=12,
                                                     color=colour, fontweight="bold" if colour != "black" else None))
    if not data.terms:
        figure.add_artist(Annotation("0", xy=(1, 0), xycoords=piece, va="bottom", fontsize=12))
    for k, note in enumerate(data.notes):
        figure.text(MARGIN, 0.15 + 0.24 * (len(data.notes) - 1 - k), note, transform=inches, fontsize=9,
                    color="#555555", va="baseline")
    return figure


def save(figure: Any, file: str | Path) -> Path:
    """Write ``figure`` to ``file`` (format by extension) and return its path."""
    path = Path(file)
    figure.savefig(path, dpi=DPI, metadata={"Software": None} if path.suffix.lower() == ".png" else None)
    return path


def plot(input_shape: Sequence[int], kernel_shape: Sequence[int], stride: int | Sequence[int] = 1,
         padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, *, figure: str = "wgrad",
         weight: int = 1, input_cell: int = 1, output_cell: int = 1, then_kernel: Sequence[int] | None = None,
         file: str | Path | None = None) -> Any:
    """Draw one pass of a small convolution: which cells meet which, and the sum they make.

    Parameters
    ----------
    input_shape, kernel_shape : tuple of 1 or 2 ints, e.g. ``(3, 3)`` and ``(2, 2)``
    stride, padding, dilation : int or tuple of ints
        As :func:`~convgrad.explain.derive`.
    figure : {"wgrad", "dgrad", "fprop"}
        The weight gradient of ``w<weight>`` (the input cells it multiplied, paired with the
        upstream gradients of the outputs they made); the input gradient of ``i<input_cell>``
        (the flipped kernel on the spread, zero-padded upstream gradient); or the forward
        pass of ``o<output_cell>`` (its receptive field).
    weight, input_cell, output_cell : int
        1-based, as the symbols ``w1, i1, o1`` are numbered (row-major); each is read only
        by its figure.
    then_kernel : tuple of ints, optional
        A second layer as large as the first one's output, as ``convgrad explain
        --then-kernel``: the figure notes where the upstream gradients come from.
    file : str or Path, optional
        Write the figure there (.png, .svg or .pdf).

    Returns
    -------
    matplotlib.figure.Figure
        On an Agg canvas.

    Raises
    ------
    convgrad.explain.MissingExtra
        When matplotlib or SymPy is not installed (``pip install "convgrad[explain]"``).
    ValueError
        Naming the argument, for a bad geometry, a 3-D one, or a choice outside its grid.
    """
    from .chain import derive_chain
    from .symbolic import derive

    require("matplotlib", "convgrad.explain.plot")
    require("sympy", "convgrad.explain.plot")
    geometry = Geometry.create(input_shape, kernel_shape, stride, padding, dilation)
    number = {"wgrad": weight, "dgrad": input_cell, "fprop": output_cell}.get(figure, weight)
    choose(geometry, figure, number, API_NAMES)
    path = None if file is None else check_file(file)
    if then_kernel is not None:
        derivation = derive_chain(input_shape, kernel_shape, then_kernel, stride, padding, dilation).first
    else:
        derivation = derive(input_shape, kernel_shape, stride, padding, dilation)
    drawn = draw(figure_data(derivation, figure, number, second_layer=then_kernel is not None))
    if path is not None:
        save(drawn, path)
    return drawn
