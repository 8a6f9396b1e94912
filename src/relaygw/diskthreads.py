"""The threads for blocking file work (fsync above all), off the reactor.

A pool of its own, big enough that the commits of many concurrent sessions
reach the disk together (the file system batches concurrent fsyncs into one
journal commit). The gateway starts it first and stops it last, after the
work in flight at shutdown has been recorded.

Not Twisted's ThreadPool: every message hands two or three jobs to it (the
commit, the removal, a rewrite), and ThreadPool's hand-off goes through
``queue.Queue``, whose locks and conditions are Python code run on the
reactor thread (``Condition.notify`` alone was 5 % of it when accepting). A
``queue.SimpleQueue`` is C; results come back with ``callFromThread``, as
ThreadPool's do.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

DISK_THREADS = 32

_Job = tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]


class DiskThreads:
    """``run(fn, *args)`` in one of up to ``size`` threads; a Deferred of its result.

    Threads are started as jobs need them (none while idle), and all of them
    live until ``stop``. Jobs queued before ``start`` run once it is called."""

    def __init__(self, reactor: Any, size: int = DISK_THREADS) -> None:
        self.reactor = reactor
        self.size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._unfinished = 0  # jobs queued or running; read and written in the reactor thread
        self._started = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._unfinished += 1
        self._jobs.put((fn, args, d))
        if self._started:
            self._add_threads()
        return d

    def start(self) -> None:
        self._started = True
        self._add_threads()

    def stop(self) -> None:
        """Let the jobs queued so far finish, then end the threads (blocking)."""
        self._started = False
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _add_threads(self) -> None:
        """One thread per unfinished job, up to ``size``: a job never waits for a
        thread while another could be started."""
        while len(self._threads) < min(self._unfinished, self.size):
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"relaygw-disk-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, d = job
            try:
                result = fn(*args)
            except BaseException:
                self.reactor.callFromThread(self._finished, d, Failure())
            else:
                self.reactor.callFromThread(self._finished, d, result)

    def _finished(self, d: Deferred[Any], result: Any) -> None:
        self._unfinished -= 1
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
