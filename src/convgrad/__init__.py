"""convgrad: the three passes of a convolution (forward, input gradient, weight gradient).

PyTorch-compatible functions on NumPy, CuPy and Numba arrays, with backends for the CPU
(NumPy) and NVIDIA GPUs (CUDA C through CuPy, Numba CUDA).  Importing convgrad imports
neither CuPy, Numba nor PyTorch: backends load on first use.
"""

from . import backends
from .options import config
from .functional import (
    conv1d,
    conv1d_input,
    conv1d_weight,
    conv2d,
    conv2d_input,
    conv2d_weight,
    conv3d,
    conv3d_input,
    conv3d_weight,
    conv_bias_grad,
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
)
from .precompiler import precompile
from .problem import ConvProblem

__version__ = "0.1.0"

__all__ = [
    "ConvProblem",
    "backends",
    "config",
    "conv1d",
    "conv1d_input",
    "conv1d_weight",
    "conv2d",
    "conv2d_input",
    "conv2d_weight",
    "conv3d",
    "conv3d_input",
    "conv3d_weight",
    "conv_bias_grad",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "precompile",
]
