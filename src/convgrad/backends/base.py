"""The one interface every backend implements (DESIGN §4).

``functional`` checks the arguments, builds the :class:`~convgrad.problem.ConvProblem`,
picks the backend, allocates ``out`` and calls one of the three passes below.  The arrays
a backend receives are always 5-D views in logical order, whatever the caller's layout:

* ``x`` / ``dx``: ``(N, C, D, H, W)``
* ``w`` / ``dw``: ``(K, C/G, T, R, S)``
* ``y`` / ``dy``: ``(N, K, Z, P, Q)``

with arbitrary element strides (recorded in the problem too), so NCHW, NHWC and sliced
views all arrive without a copy.  ``out`` must be completely overwritten.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..problem import ConvProblem


class Backend(ABC):
    """A place where the three passes of a convolution run."""

    #: Registry name, e.g. ``"numpy"``.
    name: str = ""
    #: True for backends that emulate a GPU on the CPU (never picked automatically, never benchmarked).
    emulated: bool = False
    #: Array kinds (see ``convgrad.arrays.array_kind``) the backend computes on in place.
    array_kinds: tuple[str, ...] = ("numpy",)
    #: Whether NumPy inputs are copied to the device and back when this backend is named.
    stages_numpy: bool = False

    @abstractmethod
    def available(self) -> bool:
        """Whether the backend can run here; cheap, cached, never compiles."""

    def unsupported(self, problem: ConvProblem) -> str | None:
        """Why this backend cannot run ``problem``, or None when it can."""
        return None

    def rounds_to_tf32(self, problem: ConvProblem, pass_: str) -> bool:
        """Whether ``pass_`` multiplies operands rounded to TF32 (only ever with ``problem.allow_tf32``).

        ``allow_tf32`` permits TF32 and does not require it: a backend that computes in full
        float32 returns False.  Tests compare against a TF32-rounded reference where this is True.
        """
        return False

    @abstractmethod
    def forward(self, x: Any, w: Any, bias: Any, problem: ConvProblem, out: Any) -> None:
        """``out[...] = conv(x, w) (+ bias)``; ``bias`` is ``(K,)`` or None."""

    @abstractmethod
    def grad_input(self, dy: Any, w: Any, problem: ConvProblem, out: Any) -> None:
        """``out[...] = dgrad(dy, w)``: the full convolution of ``dy`` with the flipped kernel."""

    @abstractmethod
    def grad_weight(self, x: Any, dy: Any, problem: ConvProblem, out: Any) -> None:
        """``out[...] = wgrad(x, dy)``: ``x`` correlated with ``dy``, summed over the batch."""

    def add_bias(self, out: Any, bias: Any, problem: ConvProblem) -> None:
        """Add ``bias`` ``(C,)`` along axis 1 of a logical 5-D view, in place."""
        add_bias(out, bias)

    def grad_bias(self, dy: Any, channel_axis: int, accumulate: Any) -> Any:
        """``dy`` summed over every axis but ``channel_axis``, accumulated in ``accumulate``."""
        axes = tuple(a for a in range(len(dy.shape)) if a != channel_axis)
        return dy.sum(axis=axes, dtype=accumulate).astype(dy.dtype)

    # Staging, for device backends named explicitly on NumPy arrays.
    def to_device(self, array: Any) -> Any:
        raise TypeError(f"backend {self.name!r} does not stage NumPy arrays")

    def to_host(self, array: Any) -> Any:
        raise TypeError(f"backend {self.name!r} does not stage NumPy arrays")

    def __repr__(self) -> str:
        return f"<convgrad backend {self.name!r}>"


def add_bias(out: Any, bias: Any) -> None:
    """Add ``bias`` ``(K,)`` to ``out`` ``(N, K, Z, P, Q)`` in place, for backends that do not fuse it."""
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1, 1)
