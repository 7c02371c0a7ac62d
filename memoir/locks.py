"""A readers-writer lock: many concurrent readers (generate, retrieve, save) or one writer (an edit).

An edit changes the memory in place over many optimisation steps and the bank before them;
holding the write lock for the whole edit is what makes it appear atomically to the editor's
readers and serialises edits.  The lock prefers writers (a waiting edit is not starved by a
stream of generations) and is reentrant per thread: the writer may read (an edit generates its
context templates), a reader may read again.  A reader asking to write would wait on itself
forever, so that is refused.
"""
from __future__ import annotations

import contextlib
import threading


class ReadWriteLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding a read lock
        self._writer: int | None = None  # the thread holding the write lock
        self._write_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()  # this thread's read depth

    def _read_depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextlib.contextmanager
    def reading(self):
        me = threading.get_ident()
        if self._writer == me or self._read_depth() > 0:  # reentrant: already inside
            self._local.depth = self._read_depth() + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        me = threading.get_ident()
        if self._writer == me:
            self._write_depth += 1
            try:
                yield
            finally:
                self._write_depth -= 1
            return
        if self._read_depth() > 0:
            raise RuntimeError("cannot edit while this thread is reading the editor (e.g. inside a generate "
                               "callback): it would wait for itself")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer, self._write_depth = None, 0
                self._cond.notify_all()
