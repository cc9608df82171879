"""convgrad.explain: the symbolic derivation against expressions written out by hand, and the backends."""

from __future__ import annotations

import numpy as np
import pytest

sympy = pytest.importorskip("sympy")

import convgrad
from convgrad.cli import main
from convgrad.explain import check_backends, check_chain_backends, derive, derive_chain, explain_text

i1, i2, i3, i4, i5, i6, i7, i8, i9 = sympy.symbols("i1:10")
w1, w2, w3, w4 = sympy.symbols("w1:5")
g1, g2, g3, g4 = sympy.symbols("g1:5")


def test_3x3_input_2x2_kernel_matches_the_definition():
    d = derive((3, 3), (2, 2))
    # o[p, q] = sum over r, s of i[p + r, q + s] * w[r, s], numbered row-major from 1.
    assert d.output == sympy.Matrix([
        [i1 * w1 + i2 * w2 + i4 * w3 + i5 * w4, i2 * w1 + i3 * w2 + i5 * w3 + i6 * w4],
        [i4 * w1 + i5 * w2 + i7 * w3 + i8 * w4, i5 * w1 + i6 * w2 + i8 * w3 + i9 * w4],
    ])
    # dC/dw[r, s] = sum over outputs (p, q) of i[p + r, q + s] * g[p, q].
    assert d.grad_weight == sympy.Matrix([
        [i1 * g1 + i2 * g2 + i4 * g3 + i5 * g4, i2 * g1 + i3 * g2 + i5 * g3 + i6 * g4],
        [i4 * g1 + i5 * g2 + i7 * g3 + i8 * g4, i5 * g1 + i6 * g2 + i8 * g3 + i9 * g4],
    ])
    # dC/di[a, b] = sum over the outputs (p, q) that read it, through tap (a - p, b - q).
    assert d.grad_input == sympy.Matrix([
        [w1 * g1, w2 * g1 + w1 * g2, w2 * g2],
        [w3 * g1 + w1 * g3, w4 * g1 + w3 * g2 + w2 * g3 + w1 * g4, w4 * g2 + w2 * g4],
        [w3 * g3, w4 * g3 + w3 * g4, w4 * g4],
    ])
    assert d.cost == sum(g * o for g, o in zip((g1, g2, g3, g4), d.output))
    assert d.weight_matches_correlation
    assert d.input_matches_full_convolution


def test_stride_2_by_hand():
    # 1-D: input i1..i5, kernel w1 w2, stride 2: o1 = i1 w1 + i2 w2, o2 = i3 w1 + i4 w2 (i5 is never read).
    d = derive((5,), (2,), stride=2)
    assert d.output == sympy.Matrix([[i1 * w1 + i2 * w2, i3 * w1 + i4 * w2]])
    assert d.grad_weight == sympy.Matrix([[i1 * g1 + i3 * g2, i2 * g1 + i4 * g2]])
    assert d.grad_input == sympy.Matrix([[w1 * g1, w2 * g1, w1 * g2, w2 * g2, 0]])
    assert d.weight_matches_correlation and d.input_matches_full_convolution


def test_dilation_and_padding_by_hand():
    # 1-D: input i1..i4 padded by 1 (zeros at both ends), kernel w1 w2 dilation 2:
    # o[p] = ipad[p] w1 + ipad[p + 2] w2, with ipad = (0, i1, i2, i3, i4, 0).
    d = derive((4,), (2,), padding=1, dilation=2)
    assert d.output == sympy.Matrix([[i2 * w2, i1 * w1 + i3 * w2, i2 * w1 + i4 * w2, i3 * w1]])
    assert d.grad_weight == sympy.Matrix([[i1 * g2 + i2 * g3 + i3 * g4, i2 * g1 + i3 * g2 + i4 * g3]])
    assert d.weight_matches_correlation and d.input_matches_full_convolution


@pytest.mark.parametrize("case", [
    dict(input_shape=(5, 5), kernel_shape=(2, 2), stride=2),
    dict(input_shape=(6, 5), kernel_shape=(3, 2), stride=(2, 3), padding=1),
    dict(input_shape=(5, 5), kernel_shape=(2, 2), dilation=2),
    dict(input_shape=(6, 7), kernel_shape=(2, 3), stride=2, dilation=2, padding=(1, 2)),
    dict(input_shape=(9,), kernel_shape=(3,), stride=2, dilation=2),
    dict(input_shape=(3, 4, 4), kernel_shape=(2, 2, 2), stride=(1, 2, 1)),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_closed_forms_and_every_backend(case):
    d = derive(**case)
    assert d.weight_matches_correlation
    assert d.input_matches_full_convolution
    results = check_backends(d, seed=3)
    assert [r["backend"] for r in results][0] == "numpy"
    for row in results:
        assert row["ok"], row


def test_numpy_backend_against_the_symbols_directly():
    d = derive((5, 5), (2, 2), stride=2, padding=1)
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((5, 5)), rng.standard_normal((2, 2)), rng.standard_normal(d.output_shape)
    values = dict(zip(d.input, x.flat)) | dict(zip(d.kernel, w.flat)) | dict(zip(d.upstream, g.flat))
    numeric = lambda m: np.array(m.subs(values), dtype=np.float64)
    kw = dict(stride=2, padding=1, backend="numpy")
    np.testing.assert_allclose(convgrad.conv2d(x[None, None], w[None, None], **kw)[0, 0], numeric(d.output), rtol=1e-12)
    np.testing.assert_allclose(convgrad.conv2d_weight(x[None, None], (1, 1, 2, 2), g[None, None], **kw)[0, 0],
                               numeric(d.grad_weight), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(convgrad.conv2d_input((1, 1, 5, 5), w[None, None], g[None, None], **kw)[0, 0],
                               numeric(d.grad_input), rtol=1e-12, atol=1e-12)


def test_chain_rule_per_output():
    chain = derive_chain((3, 3), (2, 2), (2, 2))
    assert chain.hidden_matches_chain and chain.weight_matches_chain
    for row in check_chain_backends(chain, seed=5):
        assert row["ok"], row
    with pytest.raises(ValueError, match="then-kernel"):
        derive_chain((3, 3), (2, 2), (3, 3))


def test_cli_two_layers(capsys):
    assert main(["explain", "--input", "3x3", "--kernel", "2x2", "--then-kernel", "2x2"]) == 0
    out = capsys.readouterr().out
    assert "∂C/∂w1 = i1·g1 + i2·g2 + i4·g3 + i5·g4" in out
    assert "∂C/∂i5 = w4·g1 + w3·g2 + w2·g3 + w1·g4" in out
    assert "o1 = i1·w1 + i2·w2 + i4·w3 + i5·w4" in out
    for k in "₁₂₃₄":
        assert f"∂C/∂o¹{k} = ∂C/∂o² · ∂o²/∂o¹{k} = w²{k} · 2(o² − y)" in out
    assert "∂C/∂w¹₁ = i1·w²₁·2(o² − y) + i2·w²₂·2(o² − y) + i4·w²₃·2(o² − y) + i5·w²₄·2(o² − y)" in out
    assert "2(o² − y)·(i1·w²₁ + i2·w²₂ + i4·w²₃ + i5·w²₄)" in out
    assert "numpy: output, grad_input, grad_weight match the symbolic results" in out
    assert "False" not in out


def test_cli_rejects_a_kernel_that_does_not_fit(capsys):
    assert main(["explain", "--input", "2x2", "--kernel", "3x3"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_shapes_of_different_ranks_are_named(capsys):
    with pytest.raises(ValueError, match=r"input_shape has 3 axes \(3x3x3\) but kernel_shape has 2 \(2x2\): they must "
                                         r"have the same number of axes"):
        derive((3, 3, 3), (2, 2))
    assert main(["explain", "--input", "3x3x3", "--kernel", "2x2"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == ("convgrad explain: --input has 3 axes (3x3x3) but --kernel has 2 (2x2): they must have "
                           "the same number of axes")
    assert out == ""


def _block(text: str, label: str) -> list[str]:
    """The lines of the matrix printed beside ``label`` (a SymPy pretty-printed block)."""
    lines = text.splitlines()
    at = next(k for k, line in enumerate(lines) if line.lstrip().startswith(label) and "⎢" in line)
    column = lines[at].index(label) + len(label)
    start, end = at, at
    while start > 0 and lines[start - 1][column:column + 4].strip().startswith(("⎡", "⎢")):
        start -= 1
    while end + 1 < len(lines) and lines[end + 1][column:column + 4].strip().startswith(("⎢", "⎣")):
        end += 1
    rows = [line[column:].strip() for line in lines[start:end + 1]]
    return [row.split("⎤")[0].split("⎥")[0].split("⎦")[0].strip("⎡⎢⎣ ") for row in rows]


def test_g_prime_is_printed_zero_padded_as_the_words_say():
    text = explain_text(derive((3, 3), (2, 2)))
    assert "G′ = G, zero-padded all round by 1 (the kernel's extent − 1)," in text
    assert [row.split() for row in _block(text, "G′ =") if row] == [
        ["0", "0", "0", "0"], ["0", "g₁", "g₂", "0"], ["0", "g₃", "g₄", "0"], ["0", "0", "0", "0"]]
    # Stride 2 spreads G; padding 1 makes the padded input 5x5, so G′ gets one more zero row
    # and column at the end for the cells no output reached.
    text = explain_text(derive((3, 3), (2, 2), stride=2, padding=1))
    assert "and by 1 more at the end for the input cells that the stride never reached," in text
    assert "cropped to the input (dropping the padding, 1 each side):" in text
    zero = ["0"] * 6
    assert [row.split() for row in _block(text, "G′ =") if row] == [
        zero, ["0", "g₁", "0", "g₂", "0", "0"], zero, ["0", "g₃", "0", "g₄", "0", "0"], zero, zero]
