"""Connections spread evenly over the HTTP workers: the launcher accepts, the workers serve.

When every worker accepts on one shared listening socket, whichever is awake when connections
arrive takes most of them (one of four workers answered 85-100 % of a wrk run: docs/benchmarks.md,
"Worker balance"). So the launcher alone accepts, and hands each new connection to the worker that
holds the fewest open connections (those within one of the fewest take turns), as a file descriptor
over a Unix socket (SCM_RIGHTS), much as Node's cluster module spreads connections. A worker serves what it is handed
with uvicorn exactly as what it would have accepted (worker.py).

- Open connections per worker = handed to it (counted by the launcher) - closed by it (counted by
  the worker in a shared counter page). Each counter has one writer: no locks.
- A worker takes connections only once it says so (its pid in the counter page, written when its
  app is up) and until it drains; connections arriving while none can take them wait in the
  listening socket's backlog.
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
COUNTERS_FD_ENV = "MMAP_COUNTERS_FD"  # the counter page (memfd) every worker writes its own row of
MAX_ACCEPTS = 256  # connections accepted in one turn before the launcher looks at its workers again
_FIELDS = 2  # per worker: [connections closed, pid while it takes connections (else 0)]


class Counters:
    """The shared counter page: one row of int64 per worker index."""

    def __init__(self, fd: int, workers: int):
        self.fd = fd
        self._map = mmap.mmap(fd, max(1, workers) * _FIELDS * 8)
        self._values = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, workers: int) -> Counters:
        fd = os.memfd_create("mmap-serve-connections", 0)
        os.ftruncate(fd, max(1, workers) * _FIELDS * 8)
        return cls(fd, workers)

    def closed(self, index: int) -> int:
        return self._values[index * _FIELDS]

    def add_closed(self, index: int) -> None:
        self._values[index * _FIELDS] += 1

    def taker(self, index: int) -> int:
        """The pid of the worker process that takes connections for `index` now, else 0."""
        return self._values[index * _FIELDS + 1]

    def set_taker(self, index: int, pid: int) -> None:
        self._values[index * _FIELDS + 1] = pid

    def takers(self) -> int:
        """How many worker indices take connections now."""
        return sum(1 for i in range(1, len(self._values), _FIELDS) if self._values[i])

    def reset(self, index: int) -> None:
        self._values[index * _FIELDS] = 0
        self._values[index * _FIELDS + 1] = 0


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
    """The launcher's side: accept on `listener`, hand each connection to the least-loaded worker that takes them."""

    def __init__(self, listener: socket.socket, workers: int):
        self.listener = listener
        listener.setblocking(False)
        self.counters = Counters.create(workers)
        self.channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
        for ours, theirs in self.channels:
            ours.setblocking(False)
            theirs.setblocking(False)  # (shared with the worker's copy) the launcher drains it when a worker dies
        self.handed = [0] * workers
        self.pids = [0] * workers  # the live process of each index (0: none)
        self._turn = 0
        self._waiting: deque[socket.socket] = deque()  # accepted, not yet handed (every channel was full)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)

    def worker_fds(self, index: int) -> dict[str, int]:
        """The descriptors a worker process inherits, by the environment variable that names each."""
        return {CONNECTIONS_FD_ENV: self.channels[index][1].fileno(), COUNTERS_FD_ENV: self.counters.fd}

    def starting(self, index: int) -> None:
        """Before a worker process for `index` is started: its counters from zero."""
        self.counters.reset(index)
        self.handed[index] = 0

    def started(self, index: int, pid: int) -> None:
        """The worker process for `index` runs: it takes connections once it writes its pid."""
        self.pids[index] = pid

    def died(self, index: int) -> None:
        """The worker of `index` is gone: what it had not received goes to the others."""
        self.pids[index] = 0
        self.starting(index)
        left = receive(self.channels[index][1]) or []
        self._waiting.extendleft(reversed(left))

    def open_connections(self, index: int) -> int:
        return self.handed[index] - self.counters.closed(index)

    def serve(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for connections and hand out what arrives (and what was waiting)."""
        takers = self._takers()
        if not takers:  # nobody to hand to: connections wait in the backlog
            time.sleep(timeout_s)
            return
        self._hand_waiting(takers)
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
        self._hand_waiting(self._takers())  # again: a worker may have started taking during the wait

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
            os.close(self.counters.fd)

    def _takers(self) -> list[int]:
        return [i for i, pid in enumerate(self.pids) if pid and self.counters.taker(i) == pid]

    def _hand_waiting(self, takers: list[int]) -> None:
        while self._waiting:
            connection = self._waiting[0]
            for index in self._by_load(takers):
                try:
                    socket.send_fds(self.channels[index][0], [b"c"], [connection.fileno()])
                except (BlockingIOError, InterruptedError):  # this worker's channel is full: the next one
                    continue
                self.handed[index] += 1
                self._turn = index
                break
            else:
                return
            self._waiting.popleft().close()  # the worker holds its own copy now

    def _by_load(self, takers: list[int]) -> list[int]:
        """Takers, fewest open connections first; those within one of the fewest take turns after the last one
        chosen (an idle keep-alive connection, a health checker's, must not send every new one elsewhere)."""
        n, load = len(self.pids), {i: self.open_connections(i) for i in takers}
        least = min(load.values())
        return sorted(takers, key=lambda i: (max(load[i], least + 1), (i - self._turn - 1) % n))
