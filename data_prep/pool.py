"""A process pool for untrusted media work: results in submission order, and a dead worker costs one task only."""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)


class CrashSafePool:
    """Worker processes that yield results in submission order and survive a worker dying.

    A dead worker (a decoder segfault on a hostile file) breaks a ProcessPoolExecutor for every task
    in flight. Here the pool is rebuilt, the task at the head is re-run alone to find the culprit
    (which becomes `on_crash(*args)`), and the tasks behind it are resubmitted.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, initializer=_worker_init, initargs=(os.getpid(),))

    def map_ordered(self, fn: Callable, args: Iterable[tuple], on_crash: Callable) -> Iterator:
        pending, window = iter(args), collections.deque()
        while True:
            while len(window) < 4 * self.workers and (a := next(pending, None)) is not None:
                window.append((a, self.pool.submit(fn, *a)))
            if not window:
                return
            a, fut = window.popleft()
            try:
                yield fut.result()
            except BrokenProcessPool:
                self._restart()
                yield self._alone(fn, a, on_crash)
                window = collections.deque((b, self.pool.submit(fn, *b)) for b, _ in window)

    def _alone(self, fn: Callable, a: tuple, on_crash: Callable):
        try:
            return self.pool.submit(fn, *a).result()
        except BrokenProcessPool:
            log.warning("a worker process died on %s", a[0])
            self._restart()
            return on_crash(*a)

    def _restart(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._new_pool()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    """Make a pool worker die with its parent: after a SIGKILLed build it would otherwise block forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
