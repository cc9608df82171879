"""cpu_workers: a call's chunks side by side, BLAS held to one thread meanwhile and restored after."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

import convgrad
from convgrad import options
from convgrad.backends import cpu_workers
from convgrad.testing.cases import ConvCase, make_array


def _blas_threads() -> list[int]:
    return [lib.num_threads for lib in cpu_workers._blas_libraries().lib_controllers]


def test_limited_to_sets_the_count_for_this_thread_only_and_restores_it():
    outside = cpu_workers.thread_count()
    seen_elsewhere = []
    with cpu_workers.limited_to(3):
        assert cpu_workers.thread_count() == 3
        with cpu_workers.limited_to(1):
            assert cpu_workers.thread_count() == 1
        assert cpu_workers.thread_count() == 3
        other = threading.Thread(target=lambda: seen_elsewhere.append(cpu_workers.thread_count()))
        other.start()
        other.join()
    assert cpu_workers.thread_count() == outside
    assert seen_elsewhere == [outside]


def test_without_a_limit_the_count_follows_numpy_blas():
    libraries = cpu_workers._blas_libraries().lib_controllers
    if not libraries:
        pytest.skip("NumPy's BLAS is not visible to threadpoolctl here")
    with cpu_workers._blas_libraries().limit(limits=1):
        assert cpu_workers.thread_count() == 1


@pytest.mark.parametrize("count, threads", [(1, 4), (5, 2), (7, 3), (3, 3), (2, 8)])
def test_blocks_are_contiguous_in_order_and_cover_every_chunk_once(count, threads):
    caller = threading.get_ident()
    seen = []

    def work(block):
        seen.append((block, threading.get_ident()))
        return list(block)

    results = cpu_workers.run_blocks(work, count, threads)
    assert [i for r in results for i in r] == list(range(count))
    assert len(results) == min(count, threads)
    assert all(len(r) > 0 for r in results)
    first_block = next(ident for block, ident in seen if block.start == 0)
    assert first_block == caller, "the first block runs on the calling thread"


def test_blas_is_held_to_one_thread_inside_the_blocks_and_restored_after():
    before = _blas_threads()
    inside = cpu_workers.run_blocks(lambda block: _blas_threads(), 4, 2)
    assert all(threads == [1] * len(before) for threads in inside)
    assert _blas_threads() == before


def test_a_failing_block_raises_and_leaves_blas_as_it_was():
    before = _blas_threads()
    finished = []

    def work(block):
        if block.start > 0:
            raise RuntimeError("planted failure")
        finished.append(block)
        return block

    with pytest.raises(RuntimeError, match="planted failure"):
        cpu_workers.run_blocks(work, 4, 2)
    assert finished == [range(0, 2)]
    assert _blas_threads() == before


def test_calls_from_two_threads_at_once_restore_blas():
    before = _blas_threads()
    barrier = threading.Barrier(2)

    def work(block):
        barrier.wait(timeout=10) if block.start == 0 else None
        return block

    failures = []

    def call():
        try:
            cpu_workers.run_blocks(work, 2, 2)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    assert not failures
    assert _blas_threads() == before


def test_blocks_see_the_callers_config():
    with convgrad.config(workspace_mb=7):
        seen = cpu_workers.run_blocks(lambda block: options.get("workspace_mb"), 2, 2)
    assert seen == [7, 7]


def _every_problem_side_by_side(monkeypatch):
    from convgrad.backends import numpy_backend

    monkeypatch.setattr(numpy_backend, "_SIDE_BY_SIDE_MIN_MACS", 0)
    monkeypatch.setattr(numpy_backend, "_SIDE_BY_SIDE_MAX_ROWS", 10**9)


def _integer_operands(case: ConvCase, dtype: str):
    rng = np.random.default_rng(11)
    return tuple(make_array(rng, shape, dtype) for shape in (case.x_shape(), case.w_shape(), case.y_shape()))


def _three_passes(case: ConvCase, x, w, g):
    kwargs = case.kwargs()
    return (convgrad.conv2d(x, w, **kwargs), convgrad.conv2d_input(x.shape, w, g, **kwargs),
            convgrad.conv2d_weight(x, w.shape, g, **kwargs))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("groups", [1, 2])
def test_numpy_backend_side_by_side_equals_one_thread_exactly(monkeypatch, dtype, groups):
    """Integer-valued data (exact in every order): 1, 2 and 3 threads give the same bits, batch chunks and groups split."""
    _every_problem_side_by_side(monkeypatch)
    case = ConvCase(2, 5, 8, 6, (9, 7), (3, 3), stride=1, padding=1, groups=groups)
    x, w, g = _integer_operands(case, dtype)
    results = {}
    for threads in (1, 2, 3):
        with cpu_workers.limited_to(threads):
            results[threads] = [r.tobytes() for r in _three_passes(case, x, w, g)]
    assert results[1] == results[2] == results[3]


def _chunked_call_in_child(queue):
    case = ConvCase(2, 4, 4, 4, (6, 6), (3, 3), padding=1)
    x, w, g = _integer_operands(case, "float32")
    with cpu_workers.limited_to(2):
        queue.put([r.tobytes() for r in _three_passes(case, x, w, g)])


def test_a_forked_child_runs_chunked_calls_after_the_parent_did(monkeypatch):
    _every_problem_side_by_side(monkeypatch)
    case = ConvCase(2, 4, 4, 4, (6, 6), (3, 3), padding=1)
    x, w, g = _integer_operands(case, "float32")
    with cpu_workers.limited_to(2):
        expected = [r.tobytes() for r in _three_passes(case, x, w, g)]  # the parent's pool is running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_chunked_call_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == expected


def test_only_short_reductions_with_large_chunks_go_side_by_side():
    from convgrad.backends import numpy_backend
    from convgrad.testing.cases import ConvCase

    def threads_for(case):
        with cpu_workers.limited_to(2):
            return numpy_backend._planned(case.problem("float32"), case.K)[1]

    assert threads_for(ConvCase(2, 8, 3, 64, (224, 224), (7, 7), stride=2, padding=3)) == 2  # a stem
    assert threads_for(ConvCase(2, 8, 64, 64, (56, 56), (3, 3), padding=1)) == 1  # 576-long reduction
    assert threads_for(ConvCase(2, 1, 3, 64, (224, 224), (7, 7), stride=2, padding=3)) == 1  # one chunk
    assert threads_for(ConvCase(2, 2, 3, 8, (16, 16), (3, 3), padding=1)) == 1  # too small to hand out


def test_side_by_side_chunks_really_run_on_two_threads(monkeypatch):
    from convgrad.backends import numpy_backend

    _every_problem_side_by_side(monkeypatch)
    seen = []
    original = numpy_backend._matmul

    def recording(a, b, out=None):
        seen.append(threading.get_ident())
        return original(a, b, out)

    monkeypatch.setattr(numpy_backend, "_matmul", recording)
    case = ConvCase(2, 4, 4, 4, (6, 6), (3, 3), padding=1)
    x, w, g = _integer_operands(case, "float32")
    for call in (lambda: convgrad.conv2d(x, w, **case.kwargs()),
                 lambda: convgrad.conv2d_input(x.shape, w, g, **case.kwargs()),
                 lambda: convgrad.conv2d_weight(x, w.shape, g, **case.kwargs())):
        seen.clear()
        with cpu_workers.limited_to(2):
            call()
        assert threading.get_ident() in seen and len(set(seen)) == 2, "one block here, one on a worker"
