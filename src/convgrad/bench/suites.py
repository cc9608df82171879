"""The built-in layer suites: the distinct convolutions of a few networks, without batch size.

``SUITES`` maps each name that ``convgrad bench --suite`` accepts to its :class:`Suite`.
Whole-model suites (``convgrad bench --model``) belong in a module of their own beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..problem import ConvProblem, conv_problem


@dataclass(frozen=True)
class Layer:
    """One convolution of a network, without its batch size."""

    C: int
    K: int
    size: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    count: int = 1  # how often the network uses this shape
    label: str = ""

    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def name(self) -> str:
        kernel = "x".join(map(str, self.kernel)) if self.ndim > 1 else f"k{self.kernel[0]}"
        if self.stride > 1:
            kernel += f"/{self.stride}"
        if self.dilation > 1:
            kernel += f"d{self.dilation}"
        size = "x".join(map(str, self.size)) if self.ndim != 2 or self.size[0] != self.size[1] else str(self.size[0])
        if self.groups == self.C and self.groups > 1:
            channels = f"dw{self.C}" if self.K == self.C else f"dw{self.C}->{self.K}"
        else:
            channels = f"{self.C}->{self.K}" + (f" g{self.groups}" if self.groups > 1 else "")
        name = f"{kernel} {channels} @{size}"
        return f"{self.label} {name}" if self.label else name

    def shapes(self, batch: int, channels_last: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Input and weight shapes in the caller's layout."""
        if channels_last:
            return (batch, *self.size, self.C), (self.K, *self.kernel, self.C // self.groups)
        return (batch, self.C, *self.size), (self.K, self.C // self.groups, *self.kernel)

    def problem(self, batch: int, dtype: str, channels_last: bool, allow_tf32: bool = False) -> ConvProblem:
        x_shape, w_shape = self.shapes(batch, channels_last)
        return conv_problem(f"conv{self.ndim}d", self.ndim, x_shape, w_shape, self.stride, self.padding,
                            self.dilation, self.groups, dtype=dtype, channels_last=channels_last,
                            allow_tf32=allow_tf32)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    layers: tuple[Layer, ...]
    batch_gpu: int
    batch_cpu: int

    def batch(self, device: str) -> int:
        return self.batch_gpu if device == "gpu" else self.batch_cpu


def _square(C: int, K: int, size: int, kernel: int, stride: int = 1, count: int = 1, groups: int = 1,
            label: str = "") -> Layer:
    return Layer(C, K, (size, size), (kernel, kernel), stride, kernel // 2, 1, groups, count, label)


def _resnet50() -> tuple[Layer, ...]:
    """Every distinct convolution of torchvision's ResNet-50 (stride on the 3x3, as v1.5) at 224x224.

    ``count`` is how many of the network's 53 convolutions have the shape.
    """
    counts: dict[tuple[int, int, int, int, int], int] = {(3, 64, 224, 7, 2): 1}
    stages = [(64, 56, 3, 1), (128, 56, 4, 2), (256, 28, 6, 2), (512, 14, 3, 2)]  # width, input size, blocks, stride
    in_channels = 64
    for width, size, blocks, stride in stages:
        expanded = width * 4
        for block in range(blocks):
            block_in = in_channels if block == 0 else expanded
            block_size = size if block == 0 else size // stride
            block_stride = stride if block == 0 else 1
            shapes = [
                (block_in, width, block_size, 1, 1),  # reduce
                (width, width, block_size, 3, block_stride),  # 3x3, strided in the first block
                (width, expanded, size // stride, 1, 1),  # expand
            ]
            if block == 0:
                shapes.append((block_in, expanded, size, 1, stride))  # projection shortcut
            for shape in shapes:
                counts[shape] = counts.get(shape, 0) + 1
        in_channels = expanded
    return tuple(_square(C, K, size, kernel, stride, count=n, label="stem" if kernel == 7 else "")
                 for (C, K, size, kernel, stride), n in counts.items())


def _mobilenetv2_depthwise() -> tuple[Layer, ...]:
    """The distinct depthwise 3x3 layers of MobileNetV2 (width 1.0, 224x224)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    counts: dict[tuple[int, int, int], int] = {}
    in_channels, size = 32, 112
    for expand, out_channels, repeats, stride in settings:
        for i in range(repeats):
            s = stride if i == 0 else 1
            hidden = in_channels * expand
            key = (hidden, size, s)
            counts[key] = counts.get(key, 0) + 1
            in_channels, size = out_channels, size // s
    return tuple(_square(c, c, size, 3, s, count=n, groups=c) for (c, size, s), n in counts.items())


def _audio1d() -> tuple[Layer, ...]:
    """A 1-D stack over 4096 samples: a strided front end, then kernels 9 down to 3, one dilated, one depthwise."""
    return (
        Layer(1, 64, (4096,), (9,), 2, 4),
        Layer(64, 64, (2048,), (7,), 1, 3),
        Layer(64, 128, (2048,), (5,), 2, 2),
        Layer(128, 128, (1024,), (5,), 1, 2),
        Layer(128, 256, (1024,), (3,), 2, 1),
        Layer(256, 256, (512,), (3,), 1, 1),
        Layer(256, 256, (512,), (3,), 1, 2, 2),
        Layer(256, 256, (512,), (9,), 1, 4, 1, 256),
    )


def _video3d() -> tuple[Layer, ...]:
    """3x3x3 convolutions of a video network at 16 frames of 56x56."""
    return (
        Layer(64, 64, (16, 56, 56), (3, 3, 3), 1, 1),
        Layer(64, 128, (16, 56, 56), (3, 3, 3), 2, 1),
        Layer(128, 128, (8, 28, 28), (3, 3, 3), 1, 1),
    )


def _quick() -> tuple[Layer, ...]:
    """One layer of each kind, small enough that a CPU runs all of them in seconds."""
    return (
        _square(3, 64, 112, 7, 2),
        _square(64, 64, 28, 3),
        _square(128, 128, 28, 3, 2),
        _square(256, 64, 28, 1),
        _square(144, 144, 28, 3, groups=144),
        Layer(64, 64, (2048,), (5,), 1, 2),
        Layer(16, 16, (8, 16, 16), (3, 3, 3), 1, 1),
    )


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("quick", "one small layer of each kind; seconds on a CPU", _quick(), batch_gpu=8, batch_cpu=2),
        Suite("resnet50", "every distinct convolution of ResNet-50 at 224x224", _resnet50(), batch_gpu=32, batch_cpu=8),
        Suite("mobilenetv2-dw", "MobileNetV2's depthwise 3x3 layers", _mobilenetv2_depthwise(), batch_gpu=32, batch_cpu=8),
        Suite("audio1d", "a 1-D stack over 4096 samples, kernels 3 to 9", _audio1d(), batch_gpu=32, batch_cpu=4),
        Suite("video3d", "3x3x3 convolutions at 16x56x56", _video3d(), batch_gpu=8, batch_cpu=1),
    )
}
