"""convgrad explain --plot: what each figure highlights is derive()'s terms; files, errors, missing extras."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

sympy = pytest.importorskip("sympy")
pytest.importorskip("matplotlib")

from convgrad.cli import main
from convgrad.explain import MissingExtra, derive, figure_data, plot
from convgrad.explain.figure import PADDING
from convgrad.explain.symbolic import entries

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GEOMETRIES = [
    dict(input_shape=(3, 3), kernel_shape=(2, 2)),
    dict(input_shape=(5, 5), kernel_shape=(2, 2), stride=2, padding=1, dilation=2),
    dict(input_shape=(6, 5), kernel_shape=(3, 2), stride=(2, 3), padding=1),
    dict(input_shape=(4, 6), kernel_shape=(2, 3), padding=(1, 0), dilation=(2, 1)),
    dict(input_shape=(7,), kernel_shape=(3,), stride=2, padding=2, dilation=2),
]


def _products(expr) -> set[frozenset[str]]:
    """The products of a sum like ``i1*g1 + i2*g2`` as sets of symbol names."""
    expr = sympy.expand(expr)
    if expr == 0:
        return set()
    found = set()
    for term in sympy.Add.make_args(expr):
        coefficient, factors = term.as_coeff_mul()
        assert coefficient == 1 and len(factors) == 2, term
        found.add(frozenset(str(f) for f in factors))
    return found


@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_highlighted_pairs_are_the_terms_of_derive(case):
    d = derive(**case)
    # grad_weight and grad_input are SymPy's derivatives of Σ g·o, not a selection of the index set.
    expressions = {"wgrad": entries(d.grad_weight), "dgrad": entries(d.grad_input), "fprop": entries(d.output)}
    for figure, exprs in expressions.items():
        for number, expr in enumerate(exprs, 1):
            data = figure_data(d, figure, number)
            counted = [pair for pair in data.pairs if not pair.padding]
            assert {pair.symbols for pair in counted} == _products(expr), (figure, number)
            assert len(counted) == len(_products(expr))
            left, right, result = data.grids
            for pair in data.pairs:
                # what the cells show is what the pair says
                assert (left.labels[pair.left], right.labels[pair.right]) == (pair.left_label, pair.right_label)
                assert pair.padding == (left.kinds[pair.left] == PADDING)
            assert [frozenset(term.split("·")) for term in data.terms] == [data.pairs[k].symbols
                                                                           for k in data.term_pairs]
            assert result.labels[result.chosen] == {"wgrad": "w", "dgrad": "i", "fprop": "o"}[figure] + str(number)
            if figure == "wgrad":  # a weight meets one cell (maybe padding) for every output
                assert len(data.pairs) == math.prod(d.output_shape)
            if figure == "fprop":  # an output meets one cell (maybe padding) for every weight
                assert len(data.pairs) == math.prod(d.kernel_shape)
            if figure in ("dgrad", "fprop"):
                (r0, c0), (r1, c1) = left.window
                assert all(r0 <= r <= r1 and c0 <= c <= c1 for r, c in (pair.left for pair in data.pairs))


def test_the_seed_example_by_hand():
    d = derive((3, 3), (2, 2))
    data = figure_data(d, "wgrad", 1)
    assert data.terms == ("i1·g1", "i2·g2", "i4·g3", "i5·g4")
    assert [(pair.left, pair.right) for pair in data.pairs] == [((0, 0), (0, 0)), ((0, 1), (0, 1)),
                                                                ((1, 0), (1, 0)), ((1, 1), (1, 1))]
    dgrad = figure_data(d, "dgrad", 5)
    assert dgrad.terms == ("w4·g1", "w3·g2", "w2·g3", "w1·g4")
    assert dgrad.grids[1].labels == {(0, 0): "w4", (0, 1): "w3", (1, 0): "w2", (1, 1): "w1"}  # flipped
    assert dgrad.grids[0].window == ((1, 1), (2, 2))  # i5's window on the zero-padded G′
    fprop = figure_data(d, "fprop", 4)
    assert fprop.terms == ("i5·w1", "i6·w2", "i8·w3", "i9·w4")
    assert fprop.grids[0].window == ((1, 1), (2, 2))


def test_dgrad_figure_shows_the_g_prime_and_kernel_that_the_text_prints():
    d = derive((5, 5), (2, 2), stride=2, padding=1, dilation=2)
    data = figure_data(d, "dgrad", 7)
    g_prime, rotated = data.grids[0], data.grids[1]
    assert g_prime.shape == d.upstream_padded.shape
    assert {cell: sympy.sympify(label) for cell, label in g_prime.labels.items()} == {
        (r, c): d.upstream_padded[r, c] for r in range(g_prime.shape[0]) for c in range(g_prime.shape[1])}
    assert {cell: sympy.sympify(label) for cell, label in rotated.labels.items()} == {
        (r, c): d.kernel_rotated[r, c] for r in range(rotated.shape[0]) for c in range(rotated.shape[1])}
    # stride and dilation zeros are gaps; the border is padding
    assert g_prime.kinds[(2, 3)] == "gap" and g_prime.kinds[(0, 0)] == PADDING and rotated.kinds[(0, 1)] == "gap"


def test_cli_writes_png_and_svg(tmp_path, capsys):
    png, svg = tmp_path / "wgrad.png", tmp_path / "dgrad.svg"
    assert main(["explain", "--input", "3x3", "--kernel", "2x2", "--plot", str(png)]) == 0
    assert f"Drew weight gradient of w1 (∂C/∂w1 = i1·g1 + i2·g2 + i4·g3 + i5·g4) to {png}" in capsys.readouterr().out
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 5000
    assert main(["explain", "--input", "5x5", "--kernel", "2x2", "--stride", "2", "--padding", "1",
                 "--input-cell", "7", "--plot", str(svg)]) == 0
    assert "Drew input gradient of i7" in capsys.readouterr().out
    root = ElementTree.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and len(list(root.iter())) > 100


def test_plot_api_returns_the_figure(tmp_path):
    figure = plot((4,), (2,), figure="fprop", output_cell=2, then_kernel=(3,), file=tmp_path / "o2.pdf")
    texts = [t.get_text() for t in figure.texts]
    assert "Forward pass of o2" in texts
    assert any("w²ₖ · 2(o² − y)" in t for t in texts)
    assert (tmp_path / "o2.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("argv, message", [
    (["--weight", "5"], "--weight must be 1 to 4, one of the 2x2 kernel's cells w1…w4, got 5"),
    (["--input-cell", "10"], "--input-cell must be 1 to 9, one of the 3x3 input's cells i1…i9, got 10"),
    (["--output-cell", "0"], "--output-cell must be 1 to 4, one of the 2x2 output's cells o1…o4, got 0"),
    (["--figure", "wgrad", "--input-cell", "2"], "--input-cell chooses what the dgrad figure draws, but --figure is "
                                                 "wgrad"),
    (["--weight", "1", "--output-cell", "2"], "--weight and --output-cell choose different figures"),
    (["--input", "3x3x3", "--kernel", "2x2x2"], "the figures draw 1-D and 2-D convolutions; --input is 3-D (3x3x3)"),
    (["--then-kernel", "3x3"], "--then-kernel must be 2x2"),
], ids=["weight", "input-cell", "output-cell", "figure-mismatch", "two-choices", "3-D", "then-kernel"])
def test_bad_choices_are_named_before_any_work(argv, message, tmp_path, capsys):
    file = tmp_path / "figure.png"
    assert main(["explain", *argv, "--plot", str(file)]) == 2
    out, err = capsys.readouterr()
    assert f"convgrad explain: {message}" in err
    assert out == "" and not file.exists()


def test_bad_files_and_options_without_plot(tmp_path, capsys):
    for argv, message in [
        (["--plot", str(tmp_path / "figure.jpg")], "--plot must end in .png, .svg, .pdf, got"),
        (["--plot", str(tmp_path / "missing" / "figure.png")], "--plot: the folder"),
        (["--weight", "2"], "--weight chooses what --plot draws; add --plot FILE"),
        (["--figure", "fprop", "--output-cell", "2"], "--output-cell and --figure choose what --plot draws"),
    ]:
        assert main(["explain", *argv]) == 2
        out, err = capsys.readouterr()
        assert message in err and out == ""
    with pytest.raises(ValueError, match="weight must be 1 to 4, one of the 2x2 kernel's cells"):
        plot((3, 3), (2, 2), weight=5)
    with pytest.raises(ValueError, match="input_cell must be 1 to 9"):
        plot((3, 3), (2, 2), figure="dgrad", input_cell=10)
    with pytest.raises(ValueError, match="figure must be one of wgrad, dgrad, fprop, got 'grad'"):
        plot((3, 3), (2, 2), figure="grad")


def test_missing_sympy_is_named_before_any_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sympy", None)
    assert main(["explain", "--input", "3x3", "--kernel", "2x2"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ('convgrad explain needs SymPy: pip install "convgrad[explain]" '
                           '(in a source checkout: pip install ".[explain]")')
    assert out == ""
    with pytest.raises(MissingExtra, match=r'convgrad.explain needs SymPy: pip install "convgrad\[explain\]"'):
        derive((3, 3), (2, 2))


def test_missing_matplotlib_is_named_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    file = tmp_path / "figure.png"
    assert main(["explain", "--plot", str(file)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ('convgrad explain --plot needs matplotlib: pip install "convgrad[explain]" '
                           '(in a source checkout: pip install ".[explain]")')
    assert out == "" and not file.exists()
    with pytest.raises(MissingExtra, match="convgrad.explain.plot needs matplotlib"):
        plot((3, 3), (2, 2))


def test_importing_explain_imports_neither_sympy_nor_matplotlib():
    code = ("import sys, convgrad.explain\n"
            "loaded = [m for m in ('sympy', 'matplotlib') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_readme_shows_the_committed_picture_and_the_command_that_makes_it():
    image = "src/convgrad/examples/explain-wgrad-3x3-k2x2.png"
    readme = (ROOT / "README.md").read_text()
    assert f"]({image})" in readme
    assert f"convgrad explain --input 3x3 --kernel 2x2 --plot {image}" in readme
    data = (ROOT / image).read_bytes()
    assert data.startswith(PNG_SIGNATURE) and 5000 < len(data) < 60_000
