"""Train a small CNN on scikit-learn's bundled digits with convgrad's hand-written layers.

    pip install "convgrad[examples]"      # scikit-learn, which holds the data
    python -m convgrad.examples.digits [--backend numpy] [--epochs N] [--seed S] [--device cpu|cuda]

The 1,797 8x8 images ship with scikit-learn, so nothing is downloaded.  The network is two
convolutions and a linear layer from :mod:`convgrad.nn`, trained with SGD and momentum;
every gradient comes from the layers' own ``backward`` methods (dgrad, wgrad and the bias
gradient of each convolution).  With ``--device cuda`` the same code runs on CuPy arrays.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from convgrad import nn


MISSING_SCIKIT_LEARN = (
    "the digits example loads its data with scikit-learn, which is not installed; "
    'install it with: pip install "convgrad[examples]"'
)


def require_scikit_learn() -> None:
    """A ModuleNotFoundError naming the extra to install, raised before any work when scikit-learn is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(MISSING_SCIKIT_LEARN, name="sklearn") from None


def build_model(rng: np.random.Generator, backend: str | None = None) -> nn.Sequential:
    """conv 1->16 (3x3, pad 1) -> ReLU -> conv 16->32 (3x3, stride 2, pad 1) -> ReLU -> linear 512->10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, rng=rng, backend=backend),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, rng=rng, backend=backend),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10, rng=rng),
    )


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test splits (stratified, 25% test): images (n, 1, 8, 8) float32, standardised."""
    require_scikit_learn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std, y_train.astype(np.int64), y_test.astype(np.int64)


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar (rich, else tqdm, else one line per epoch); yields ``advance(status)``."""
    if not enabled:
        yield lambda status: None
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        pass
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}"))
        with Progress(*columns) as progress:
            task = progress.add_task(description, total=total, status="")
            yield lambda status: progress.update(task, advance=1, status=status)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        count = [0]

        def line(status: str) -> None:
            count[0] += 1
            print(f"{description} {count[0]}/{total} {status}", flush=True)

        yield line
        return
    with tqdm(total=total, desc=description) as bar:
        def advance(status: str) -> None:
            bar.set_postfix_str(status)
            bar.update(1)

        yield advance


def accuracy(model: nn.Sequential, images: Any, labels: Any, batch_size: int = 256) -> float:
    """Fraction of ``images`` whose highest logit is the label."""
    xp = nn.array_module(images)
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((xp.argmax(logits, axis=1) == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def _blas_threads(device: str) -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread on the CPU: the GEMMs here are tiny, and a second thread costs more than it gives."""
    if device != "cpu":
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def train(epochs: int = 8, seed: int = 0, backend: str | None = "numpy", device: str = "cpu", batch_size: int = 32,
          lr: float = 0.05, momentum: float = 0.9, progress: bool = True) -> dict[str, float]:
    """Train the CNN and return ``{"accuracy", "seconds", "loss"}`` (test accuracy, wall time, last epoch's loss)."""
    require_scikit_learn()
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    x_train, x_test, y_train, y_test = load_data(seed)
    model = build_model(rng, backend)
    xp: Any = np
    if device == "cuda":
        import cupy

        xp = cupy
        model.to("cuda")
        x_train, x_test, y_train, y_test = (cupy.asarray(a) for a in (x_train, x_test, y_train, y_test))
    loss_fn = nn.SoftmaxCrossEntropy()
    optimizer = nn.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps = (x_train.shape[0] + batch_size - 1) // batch_size
    loss_sum = 0.0
    with _blas_threads(device), _progress(epochs * steps, "training", progress) as advance:
        for epoch in range(epochs):
            order = xp.asarray(rng.permutation(x_train.shape[0]))
            loss_sum = 0.0
            for step in range(steps):
                batch = order[step * batch_size:(step + 1) * batch_size]
                loss = loss_fn(model(x_train[batch]), y_train[batch])
                model.backward(loss_fn.backward())
                optimizer.step()
                optimizer.zero_grad()
                loss_sum += loss
                advance(f"epoch {epoch + 1} loss {loss_sum / (step + 1):.4f}")
        test_accuracy = accuracy(model, x_test, y_test)
    return {
        "accuracy": test_accuracy,
        "seconds": time.perf_counter() - started,
        "loss": loss_sum / steps,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m convgrad.examples.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default=None, help="convgrad backend (default: numpy on cpu, automatic on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs on CuPy arrays")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        require_scikit_learn()
    except ModuleNotFoundError as error:
        sys.exit(f"error: {error}")
    backend = args.backend if args.backend is not None else ("numpy" if args.device == "cpu" else None)
    result = train(epochs=args.epochs, seed=args.seed, backend=backend, device=args.device,
                   batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress)
    print(f"test accuracy {result['accuracy']:.2%} ({result['seconds']:.1f} s, backend {backend or 'auto'}, "
          f"{args.device})")
    return result


if __name__ == "__main__":
    main()
