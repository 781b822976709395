"""Connections spread evenly over the HTTP workers: the launcher accepts, the workers serve.

When every worker accepts on one shared listening socket, whichever is awake when connections
arrive takes most of them (docs/benchmarks.md, "Worker balance"). So the launcher alone accepts,
and hands the connections to the workers in turn, each as a file descriptor over a Unix socket
(SCM_RIGHTS), as Node's cluster module does by default. A worker serves what it is handed with
uvicorn exactly as what it would have accepted (service/http/worker.py).

- In turn, not "fewest open connections": that count lags (a worker counts a connection closed when
  its loop gets to it), so a burst of new connections arriving while the old ones close goes mostly to
  one worker; in turn splits any burst evenly, whatever is open.
- A worker takes connections only once it says so (its pid in a shared page, a memfd, written when
  its app is up) and until it drains; connections arriving while none can take them wait in the
  listening socket's backlog. A worker whose channel is full (it stopped reading) is passed over.
- Each worker index has one socket pair, held by the launcher for the life of the service. When a
  worker dies, what was handed to it but not yet received is taken back and handed to the others,
  so replacing a worker loses no connection it had not started to serve.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import selectors
import socket
import time
from collections import deque

CONNECTIONS_FD_ENV = "MMAP_CONNECTIONS_FD"  # a worker's end of its socket pair with the launcher
TAKERS_FD_ENV = "MMAP_TAKERS_FD"  # the page (memfd) where each worker says that it takes connections
MAX_ACCEPTS = 256  # connections accepted in one turn before the launcher looks at its workers again


class Takers:
    """The shared page: per worker index, the pid of the process that takes connections for it now (else 0).
    Each entry has one writer at a time (the worker; the launcher before it starts one): no lock."""

    def __init__(self, fd: int, workers: int):
        self.fd = fd
        self._map = mmap.mmap(fd, max(1, workers) * 8)
        self._pids = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, workers: int) -> Takers:
        fd = os.memfd_create("mmap-serve-takers", 0)
        os.ftruncate(fd, max(1, workers) * 8)
        return cls(fd, workers)

    def pid(self, index: int) -> int:
        return self._pids[index]

    def set(self, index: int, pid: int) -> None:
        self._pids[index] = pid

    def count(self) -> int:
        """How many worker indices take connections now."""
        return sum(1 for pid in self._pids if pid)


def receive(channel: socket.socket) -> list[socket.socket] | None:
    """Every connection waiting on a worker's end of its channel (non-blocking); None once the launcher is gone."""
    connections = []
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1, 16)
        except (BlockingIOError, InterruptedError):
            return connections
        if not data and not fds:
            return connections or None
        connections.extend(socket.socket(fileno=fd) for fd in fds)


class Balancer:
    """The launcher's side: accept on `listener`, hand the connections in turn to the workers that take them."""

    def __init__(self, listener: socket.socket, workers: int):
        self.listener = listener
        listener.setblocking(False)
        self.takers = Takers.create(workers)
        self.channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
        for ours, theirs in self.channels:
            ours.setblocking(False)
            theirs.setblocking(False)  # (shared with the worker's copy) the launcher drains it when a worker dies
        self.pids = [0] * workers  # the live process of each index (0: none)
        self._turn = -1  # the index that got the last one
        self._waiting: deque[socket.socket] = deque()  # accepted, not yet handed (every channel was full)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)

    def worker_fds(self, index: int) -> dict[str, int]:
        """The descriptors a worker process inherits, by the environment variable that names each."""
        return {CONNECTIONS_FD_ENV: self.channels[index][1].fileno(), TAKERS_FD_ENV: self.takers.fd}

    def starting(self, index: int) -> None:
        """Before a worker process for `index` is started: it takes nothing until it says so."""
        self.takers.set(index, 0)

    def started(self, index: int, pid: int) -> None:
        """The worker process for `index` runs: it takes connections once it writes its pid."""
        self.pids[index] = pid

    def died(self, index: int) -> None:
        """The worker of `index` is gone: what it had not received goes to the others."""
        self.pids[index] = 0
        self.takers.set(index, 0)
        left = receive(self.channels[index][1]) or []
        self._waiting.extendleft(reversed(left))

    def serve(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for connections and hand out what arrives (and what was waiting)."""
        if not self._taking():  # nobody to hand to: connections wait in the backlog
            time.sleep(timeout_s)
            return
        self._hand_waiting()
        if self._waiting:  # every channel full: leave new ones in the backlog
            time.sleep(min(timeout_s, 0.01))
            return
        if not self._selector.select(timeout_s):
            return
        for _ in range(MAX_ACCEPTS):
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. the peer reset before accept, or out of descriptors: nothing to hand
                break
            self._waiting.append(connection)
        self._hand_waiting()

    def close(self) -> None:
        """Stop accepting; connections not yet handed are closed (as a listening socket's backlog would be)."""
        self._selector.close()
        self.listener.close()
        while self._waiting:
            self._waiting.popleft().close()
        for ours, theirs in self.channels:
            ours.close()
            theirs.close()
        with contextlib.suppress(OSError):
            os.close(self.takers.fd)

    def _taking(self) -> list[int]:
        return [i for i, pid in enumerate(self.pids) if pid and self.takers.pid(i) == pid]

    def _hand_waiting(self) -> None:
        taking = self._taking()  # read now: a worker may have started taking during the wait
        while self._waiting and taking:
            connection = self._waiting[0]
            start = next((k for k, i in enumerate(taking) if i > self._turn), 0)
            for index in taking[start:] + taking[:start]:  # in turn after the last one
                try:
                    socket.send_fds(self.channels[index][0], [b"c"], [connection.fileno()])
                except (BlockingIOError, InterruptedError):  # this worker's channel is full: the next one
                    continue
                self._turn = index
                break
            else:
                return
            self._waiting.popleft().close()  # the worker holds its own copy now
