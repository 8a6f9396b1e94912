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

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

DISK_THREADS = 32

_Job = tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]


class DiskThreads:
    """``run(fn, *args)`` in one of up to ``size`` threads; a Deferred of its result.

    Threads are started as jobs need them (none while idle), and all of them
    live until ``stop``. Jobs queued before ``start`` run once it is called."""

    log = Logger()

    def __init__(self, reactor: Any, size: int = DISK_THREADS) -> None:
        self.reactor = reactor
        self.size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._unfinished = 0  # jobs queued or running; read and written in the reactor thread
        self._started = False

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Threads are added before the job is queued: a job is either queued (and
        will run) or refused with the error, never both."""
        if self._started:
            try:
                self._add_threads(self._unfinished + 1)
            except RuntimeError as e:  # "can't start new thread"
                if not self._threads:
                    return fail(e)
                self.log.warn("disk threads: cannot start another ({error}); {count} do"
                              " the work", error=e, count=len(self._threads))
        d: Deferred[Any] = Deferred()
        self._unfinished += 1
        self._jobs.put((fn, args, d))
        return d

    def start(self) -> None:
        self._started = True
        self._add_threads(self._unfinished)

    def stop(self) -> None:
        """Let the jobs queued so far finish, then end the threads (blocking)."""
        self._started = False
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _add_threads(self, jobs: int) -> None:
        """One thread per unfinished job, up to ``size``: a job never waits for a
        thread while another could be started. A thread is counted once started."""
        while len(self._threads) < min(jobs, self.size):
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"relaygw-disk-{len(self._threads)}")
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)
            del job  # an idle thread keeps nothing of its last job alive

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], d: Deferred[Any]) -> None:
        """One job; its arguments, result and Deferred die with this frame."""
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
