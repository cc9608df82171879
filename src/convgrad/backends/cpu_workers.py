"""Independent chunks of one CPU call run side by side, one per core, each with one-thread BLAS.

The ``numpy`` backend splits a call into batch chunks that read and write disjoint memory.
Run one after another, each chunk's NumPy work (padding, im2col, transposes, the col2im
scatter, the store) is single-threaded, and only its GEMM uses the other cores; on a
machine with few cores, OpenBLAS's worker threads then busy-wait beside that single-threaded
work and slow it down (on two cores, im2col took twice as long while they spun).  Here the
chunks are instead dealt out to ``threads`` threads, every piece of work of a chunk runs on
its thread, and BLAS is held to one thread for the duration, so no BLAS pool wakes at all.
The caller decides when that pays (the ``numpy`` backend: only for GEMMs with short
reductions; with long ones OpenBLAS's own threads split the GEMM as well).

Chunk ``i`` of ``count`` goes to thread ``i * threads // count`` (contiguous blocks, the
first on the calling thread): which thread computes what depends only on the problem and
the thread count, so results that are summed per thread (the weight gradient) are
bit-identical run to run for the same thread count.

The thread count is, in order: the ``threads`` given to :func:`limited_to` on the calling
thread (``convgrad.torch`` passes PyTorch's), else the thread count NumPy's BLAS is set to
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or the core count), so a user who limits
NumPy's BLAS limits convgrad's CPU threads too.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, TypeVar

Result = TypeVar("Result")

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas: Any = None  # threadpoolctl's controller for the loaded BLAS libraries, built on first use
# BLAS is held to one thread while any call's blocks run; the first call to enter saves the
# libraries' thread counts and the last to leave restores them, so calls from several
# threads at once cannot leave BLAS limited.
_limit_lock = threading.Lock()
_limit_depth = 0
_saved_counts: list[int] = []


def _new_pool_in_child() -> None:
    # A forked child has none of the parent's threads; its first call builds its own pool.
    global _pool, _pool_size, _pool_lock, _limit_lock, _limit_depth
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()
    _limit_lock, _limit_depth = threading.Lock(), 0


os.register_at_fork(after_in_child=_new_pool_in_child)


def _blas_libraries() -> Any:
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


@contextlib.contextmanager
def limited_to(threads: int) -> Iterator[None]:
    """Calls made on this thread inside the block use at most ``threads`` CPU threads."""
    previous = getattr(_local, "threads", None)
    _local.threads = max(1, int(threads))
    try:
        yield
    finally:
        _local.threads = previous


def thread_count() -> int:
    """How many threads a call made now on this thread may use (see the module docstring)."""
    limit = getattr(_local, "threads", None)
    if limit is not None:
        return limit
    with _limit_lock:
        counts = _saved_counts if _limit_depth else [lib.num_threads for lib in _blas_libraries().lib_controllers]
    return max(1, min(counts) if counts else (os.cpu_count() or 1))


@contextlib.contextmanager
def _blas_on_one_thread() -> Iterator[None]:
    global _limit_depth, _saved_counts
    libraries = _blas_libraries().lib_controllers
    with _limit_lock:
        if _limit_depth == 0:
            _saved_counts = [lib.num_threads for lib in libraries]
            for lib in libraries:
                lib.set_num_threads(1)
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                for lib, count in zip(libraries, _saved_counts):
                    lib.set_num_threads(count)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            # A smaller pool is dropped, not shut down: a call on another thread may still be
            # submitting to it; its threads end once it is garbage collected.
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convgrad-cpu")
            _pool_size = workers
        return _pool


def run_blocks(work: Callable[[range], Result], count: int, threads: int) -> list[Result]:
    """``work(block)`` for ``threads`` contiguous blocks of ``range(count)``, side by side.

    Parameters
    ----------
    work : callable
        Takes a ``range`` of chunk indices and processes them in order; called once per
        block, the first block on the calling thread.  Blocks must touch disjoint memory.
    count : int
        Number of chunks.
    threads : int
        Number of blocks (at most ``count``).  With one, ``work(range(count))`` runs here,
        with BLAS as the caller set it.

    Returns
    -------
    list
        Each block's return value, in block order.
    """
    threads = max(1, min(threads, count))
    if threads == 1:
        return [work(range(count))]
    blocks = [range(b * count // threads, (b + 1) * count // threads) for b in range(threads)]
    with _blas_on_one_thread():
        # Each worker sees the caller's convgrad.config (a context variable).
        pool = _executor(threads - 1)
        futures = [pool.submit(contextvars.copy_context().run, work, block) for block in blocks[1:]]
        try:
            first = work(blocks[0])
        finally:
            wait(futures)  # never leave a block running past the call, even when one failed
    return [first, *(future.result() for future in futures)]
