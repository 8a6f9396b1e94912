"""DiskThreads: jobs run in threads, results come back through callFromThread,
threads start only as jobs need them, and stop lets queued jobs finish."""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relaygw.diskthreads import DiskThreads

WAIT = 10.0  # seconds: a safety net for a hung thread, never a pace


class ThreadCalls:
    """The reactor's callFromThread: what the threads hand back, run by the test."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = \
            queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_next(self) -> None:
        f, args = self.calls.get(timeout=WAIT)
        f(*args)


def outcome(d: Deferred[Any]) -> Any:
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen, "not fired"
    return seen[0]


def disk_threads_of(pool: DiskThreads) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relaygw-disk-")
            and t in pool._threads]


def test_a_job_runs_in_another_thread_and_its_result_comes_back_through_the_reactor() -> None:
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=2)
    pool.start()
    try:
        d = pool.run(lambda a, b: (a + b, threading.current_thread().name), 2, 3)
        assert not d.called  # only in the reactor thread, by callFromThread
        reactor.run_next()
        total, thread_name = outcome(d)
        assert total == 5 and thread_name.startswith("relaygw-disk-")
    finally:
        pool.stop()


def test_an_exception_in_a_job_is_the_deferreds_failure() -> None:
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=1)
    pool.start()

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        d = pool.run(full)
        reactor.run_next()
        failure = outcome(d)
        assert isinstance(failure, Failure) and failure.check(OSError)
        assert failure.value.errno == errno.ENOSPC
    finally:
        pool.stop()


def test_jobs_queued_before_start_wait_for_it() -> None:
    """The gateway builds its services first and starts the threads in startService."""
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=2)
    d = pool.run(lambda: "done")
    assert pool._threads == []
    pool.start()
    try:
        reactor.run_next()
        assert outcome(d) == "done"
    finally:
        pool.stop()


def test_threads_start_only_as_jobs_need_them_and_never_past_size() -> None:
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=3)
    pool.start()
    release = threading.Event()
    running = threading.Semaphore(0)

    def blocked(n: int) -> int:
        running.release()
        assert release.wait(WAIT)
        return n

    try:
        assert disk_threads_of(pool) == []  # idle: no thread at all
        results = [pool.run(blocked, n) for n in range(5)]
        for _ in range(3):
            assert running.acquire(timeout=WAIT)  # three run at once...
        assert len(pool._threads) == 3  # ...and no more threads than size
        release.set()
        for _ in range(5):
            reactor.run_next()
        assert [outcome(d) for d in results] == list(range(5))
    finally:
        release.set()
        pool.stop()


def test_stop_lets_the_queued_jobs_finish_then_ends_every_thread() -> None:
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=1)
    pool.start()
    order: list[int] = []
    for n in range(4):
        pool.run(order.append, n)
    threads = list(pool._threads)
    pool.stop()
    assert order == [0, 1, 2, 3]
    assert threads and not any(t.is_alive() for t in threads)
    assert pool._threads == []


@pytest.mark.parametrize("size", [1, 4])
def test_every_result_is_handed_back_exactly_once(size: int) -> None:
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=size)
    pool.start()
    try:
        results = [pool.run(lambda n: n * n, n) for n in range(50)]
        for _ in range(50):
            reactor.run_next()
        assert [outcome(d) for d in results] == [n * n for n in range(50)]
        assert reactor.calls.empty()
    finally:
        pool.stop()


def test_a_job_refused_for_want_of_a_thread_never_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread can be started and none runs: the job is refused with the error and
    never run later (a commit that ran after its session was told it failed would be
    delivered twice); stop() still works."""
    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=2)
    pool.start()
    ran: list[str] = []

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    d = pool.run(ran.append, "commit")
    failure = outcome(d)
    assert isinstance(failure, Failure) and failure.check(RuntimeError)
    assert pool._threads == [] and pool._unfinished == 0
    monkeypatch.undo()
    later = pool.run(ran.append, "later")
    reactor.run_next()
    outcome(later)
    pool.stop()
    assert ran == ["later"]


def test_an_idle_thread_keeps_nothing_of_its_last_job() -> None:
    """Arguments (an Incoming, a password to check) and results die with the job."""
    import gc
    import weakref

    class Payload:
        pass

    reactor = ThreadCalls()
    pool = DiskThreads(reactor, size=1)
    pool.start()
    try:
        argument = Payload()
        seen = weakref.ref(argument)
        d = pool.run(lambda p: Payload(), argument)
        reactor.run_next()
        result = weakref.ref(outcome(d))
        del argument, d
        gc.collect()
        assert seen() is None and result() is None
    finally:
        pool.stop()
