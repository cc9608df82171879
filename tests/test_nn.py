"""convgrad.nn: every layer's backward against finite differences and against convgrad.torch.

Layers are built in float64 so that central differences are accurate to ~1e-9; each
convolution is linear in each of its arguments, so the differences are exact up to
rounding.  The digits example is run in-process and must reach 95%.
"""

from __future__ import annotations

import numpy as np
import pytest

from convgrad import nn

RTOL = 1e-7


def numeric_gradient(loss, array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss()`` with respect to every element of ``array`` (changed in place, then restored)."""
    grad = np.zeros_like(array)
    flat, grad_flat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        plus = loss()
        flat[i] = saved - eps
        minus = loss()
        flat[i] = saved
        grad_flat[i] = (plus - minus) / (2 * eps)
    return grad


def check_layer(layer: nn.Layer, x: np.ndarray, seed: int = 0) -> None:
    """backward() matches finite differences of <layer(x), g> for the input and every parameter."""
    rng = np.random.default_rng(seed)
    y = layer.forward(x)
    g = rng.standard_normal(y.shape)
    grad_x = layer.backward(g)

    def loss() -> float:
        return float((layer.forward(x) * g).sum())

    assert grad_x.shape == x.shape
    np.testing.assert_allclose(grad_x, numeric_gradient(loss, x), rtol=RTOL, atol=RTOL)
    for parameter in layer.parameters():
        np.testing.assert_allclose(parameter.grad, numeric_gradient(loss, parameter.data), rtol=RTOL, atol=RTOL)


def _rng(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


# (name, layer factory, input shape)
CONV_CASES = [
    ("conv1d_s2_p1_g2", lambda r: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, dtype=np.float64, rng=r), (2, 4, 9)),
    ("conv2d_asym_dil_g2", lambda r: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=((1, 0), (0, 1)), dilation=(1, 2),
                                              groups=2, dtype=np.float64, rng=r), (2, 4, 7, 6)),
    ("conv2d_depthwise_same", lambda r: nn.Conv2d(4, 8, 3, padding="same", groups=4, dtype=np.float64, rng=r),
     (2, 4, 5, 5)),
    ("conv2d_unbatched_nobias", lambda r: nn.Conv2d(3, 2, 2, bias=False, dtype=np.float64, rng=r), (3, 4, 5)),
    ("conv3d_s_p", lambda r: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1, dtype=np.float64, rng=r),
     (1, 2, 4, 5, 4)),
    ("convT1d_s2_op1_g2", lambda r: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                       dtype=np.float64, rng=r), (2, 4, 5)),
    ("convT2d_crop", lambda r: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=0, output_padding=2, dilation=3,
                                                  dtype=np.float64, rng=r), (2, 4, 3, 4)),
    ("convT3d_s2_p1", lambda r: nn.ConvTranspose3d(2, 3, 2, stride=2, padding=1, output_padding=1, dtype=np.float64,
                                                   rng=r), (1, 2, 3, 3, 2)),
]


@pytest.mark.parametrize("name, make, shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_layer_backward_matches_finite_differences(name, make, shape):
    layer = make(_rng())
    check_layer(layer, _rng(2).standard_normal(shape))


def test_linear_backward_matches_finite_differences():
    check_layer(nn.Linear(5, 3, dtype=np.float64, rng=_rng()), _rng(2).standard_normal((4, 5)))


def test_relu_and_flatten_backward():
    x = _rng(2).standard_normal((2, 3, 4))
    x = np.sign(x) * (0.1 + np.abs(x))  # away from the kink at 0
    check_layer(nn.ReLU(), x)
    check_layer(nn.Flatten(), x)


def test_sequential_backward_matches_finite_differences():
    r = _rng()
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64, rng=r), nn.ReLU(),
                          nn.Conv2d(3, 4, 2, stride=2, dtype=np.float64, rng=r), nn.Flatten(),
                          nn.Linear(16, 3, dtype=np.float64, rng=r))
    x = _rng(3).standard_normal((2, 2, 4, 4))
    check_layer(model, x)


def test_softmax_cross_entropy_gradient():
    logits = _rng(2).standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss_fn = nn.SoftmaxCrossEntropy()
    loss = loss_fn(logits, labels)
    expected = -np.mean(np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[np.arange(5), labels])
    assert loss == pytest.approx(expected, rel=1e-12)
    grad = loss_fn.backward()
    np.testing.assert_allclose(grad, numeric_gradient(lambda: loss_fn.forward(logits, labels), logits), rtol=RTOL,
                               atol=RTOL)


def test_gradients_accumulate_until_zero_grad():
    layer = nn.Conv2d(2, 3, 3, dtype=np.float64, rng=_rng())
    x = _rng(2).standard_normal((1, 2, 5, 5))
    g = np.ones((1, 3, 3, 3))
    layer.forward(x)
    layer.backward(g)
    once = layer.weight.grad.copy()
    layer.backward(g)
    np.testing.assert_allclose(layer.weight.grad, 2 * once)
    optimizer = nn.SGD(layer.parameters(), lr=0.1)
    optimizer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


# ----------------------------------------------------------------------------------------
# Against convgrad.torch (and so, through tests/test_torch.py, against PyTorch itself)


@pytest.mark.parametrize("name, make, shape", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_layer_matches_convgrad_torch(name, make, shape):
    torch = pytest.importorskip("torch")
    import convgrad.torch as ct

    layer = make(_rng())
    x = _rng(2).standard_normal(shape)
    y = layer.forward(x)
    g = _rng(3).standard_normal(y.shape)
    grad_x = layer.backward(g)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.weight.data, requires_grad=True)
    bt = None if layer.bias is None else torch.tensor(layer.bias.data, requires_grad=True)
    n = layer.ndim
    if isinstance(layer, nn._ConvTransposeNd):
        yt = getattr(ct, f"conv_transpose{n}d")(xt, wt, bt, layer.stride, layer.padding, layer.output_padding,
                                                 layer.groups, layer.dilation)
    else:
        yt = getattr(ct, f"conv{n}d")(xt, wt, bt, layer.stride, layer.padding, layer.dilation, layer.groups)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_x, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    if bt is not None:
        np.testing.assert_allclose(layer.bias.grad, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_linear_and_sgd_match_torch():
    torch = pytest.importorskip("torch")
    layer = nn.Linear(5, 3, dtype=np.float64, rng=_rng())
    reference = torch.nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(layer.weight.data))
        reference.bias.copy_(torch.tensor(layer.bias.data))
    ours = nn.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    theirs = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(3):
        x = _rng(10 + step).standard_normal((4, 5))
        g = _rng(20 + step).standard_normal((4, 3))
        layer.forward(x)
        layer.backward(g)
        ours.step()
        ours.zero_grad()
        reference(torch.tensor(x)).backward(torch.tensor(g))
        theirs.step()
        theirs.zero_grad()
    np.testing.assert_allclose(layer.weight.data, reference.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.bias.data, reference.bias.detach().numpy(), rtol=1e-12)


# ----------------------------------------------------------------------------------------
# The example


def test_digits_example_reaches_95_percent():
    pytest.importorskip("sklearn")
    from convgrad.examples import digits

    result = digits.train(seed=0, progress=False)
    assert result["accuracy"] >= 0.95, result
    assert result["seconds"] < 60, result


def test_digits_example_command_line(capsys):
    pytest.importorskip("sklearn")
    from convgrad.examples import digits

    result = digits.main(["--epochs", "1", "--seed", "3", "--no-progress"])
    assert "test accuracy" in capsys.readouterr().out
    assert 0 <= result["accuracy"] <= 1


def test_layers_run_on_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layer = nn.Conv2d(2, 3, 3, padding=1, rng=_rng())
    x = _rng(2).standard_normal((2, 2, 5, 5)).astype(np.float32)
    expected = layer.forward(x)
    expected_grad = layer.backward(np.ones_like(expected))
    layer.to("cuda")
    y = layer.forward(cupy.asarray(x))
    assert isinstance(y, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(y), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(layer.backward(cupy.ones_like(y))), expected_grad, rtol=1e-5, atol=1e-5)
