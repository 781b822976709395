"""`python -m service`: bind the socket, start the engine, start the HTTP workers, supervise them.

1. The listening socket is bound first: a port in use fails at once, before any model loads.
2. The engine process (engine.py) loads the backbone and binds its ZeroMQ socket in a private
   runtime directory; it then writes its `EngineInfo` on a pipe. A failure there ends the launcher
   with the engine's reason and exit status 1.
3. `workers` HTTP worker processes (worker.py) start; the launcher accepts on the listening socket
   and hands the connections to the workers in turn (balancer.py).
4. Supervision: a worker that dies is replaced (the others keep serving; a worker that keeps dying
   at start is restarted with a growing delay). If the engine dies, the workers have already
   answered 503 to what they held; the launcher stops them and exits 1 within a few seconds, so an
   orchestrator restarts the whole service.
5. SIGTERM or SIGINT: the launcher closes the listening socket and passes SIGTERM on to the
   workers, which stop accepting and drain (`drain_timeout_s`); then the engine stops. Exit 0, no
   process left behind, nothing left in /dev/shm or the runtime directory.

Children die with the launcher (PR_SET_PDEATHSIG on Linux) even if it is killed with -9.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .balancer import Balancer
from .logs import configure_logging
from .metrics import MULTIPROC_ENV
from .settings import SETTINGS_ENV, Settings, settings_to_env
from .transport import (
    ENGINE_ADDRESS_ENV,
    ENGINE_INFO_ENV,
    ENGINE_READY_FD_ENV,
    LAUNCHER_PID_ENV,
    SHM_DIR,
    SHM_PREFIX,
    WORKER_INDEX_ENV,
    engine_info_from_json,
    engine_info_json,
    ring_prefix,
)

log = logging.getLogger("service.launcher")

TICK_S = 0.1
ENGINE_GONE_EXIT_S = 3.0  # after the engine died: how long workers get to answer what they hold
ENGINE_STOP_S = 10.0
RESTART_DELAYS_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # a worker dying again within STABLE_S backs off
STABLE_S = 30.0


class LaunchFailed(RuntimeError):
    """The service cannot start (port in use, the engine failed); the message says why."""


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the launcher dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def bind(settings: Settings) -> socket.socket:
    """The service's listening socket (the launcher accepts on it, balancer.py)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as e:
        raise LaunchFailed(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from e
    return listener


class _Child:
    def __init__(self, process: subprocess.Popen, started: float):
        self.process = process
        self.started = started


class Launcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stopping = False
        self.runtime = Path(tempfile.mkdtemp(prefix=f"{SHM_PREFIX}-{os.getpid()}-"))  # the engine's socket, metrics
        self.metrics_dir = self.runtime / "metrics"
        self.metrics_dir.mkdir()
        self.env = {**os.environ, SETTINGS_ENV: settings_to_env(settings), MULTIPROC_ENV: str(self.metrics_dir),
                    LAUNCHER_PID_ENV: str(os.getpid())}
        self.listener: socket.socket | None = None
        self.balancer: Balancer | None = None
        self.engine: subprocess.Popen | None = None
        self.engine_info = b""
        self.workers: dict[int, _Child] = {}
        self._failures: dict[int, int] = {}  # worker index -> deaths in a row before it ran STABLE_S

    def run(self) -> int:
        """Start everything and supervise until stopped; the process's exit status."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            self.listener = bind(self.settings)
            if not self.settings.prompts.is_dir():
                raise LaunchFailed(f"the prompt directory {self.settings.prompts} does not exist or is not a "
                                   "directory (--prompts / MMAP_PROMPTS)")
            self._start_engine()
            if self.stopping:
                return 0
            self.balancer = Balancer(self.listener, self.settings.workers)
            for index in range(self.settings.workers):
                self._start_worker(index)
            log.info("serving on http://%s:%d with %d HTTP workers (pids %s) and the engine (pid %d)",
                     self.settings.host, self.listener.getsockname()[1], len(self.workers),
                     ", ".join(str(w.process.pid) for w in self.workers.values()), self.engine.pid)
            return self._supervise()
        except LaunchFailed as e:
            log.error("%s", e)
            return 1
        finally:
            self._shut_down()

    def _stop(self, signum: int, frame: object) -> None:
        if not self.stopping:
            log.info("%s: stopping (in-flight requests get %g s)", signal.Signals(signum).name,
                     self.settings.drain_timeout_s)
        self.stopping = True

    def _spawn(self, module: str, env: dict[str, str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
        # A session of its own: a signal to the launcher's process group (Ctrl-C, `timeout`) reaches the
        # launcher alone, which stops the children in order.
        return subprocess.Popen([sys.executable, "-m", module], env={**self.env, **env}, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent, start_new_session=True)

    def _start_engine(self) -> None:
        read_fd, write_fd = os.pipe()
        env = {ENGINE_READY_FD_ENV: str(write_fd), ENGINE_ADDRESS_ENV: f"ipc://{self.runtime / 'engine.sock'}"}
        env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # idle threads yield the CPU
        self.engine = self._spawn("service.engine.loop", env, (write_fd,))
        os.close(write_fd)
        line = b""
        with os.fdopen(read_fd, "rb", buffering=0) as ready:
            while not line.endswith(b"\n") and not self.stopping:
                if select.select([ready], [], [], TICK_S)[0]:
                    chunk = ready.read(65536)
                    if not chunk:
                        break
                    line += chunk
        if self.stopping:
            return
        if not line.endswith(b"\n"):
            code = self.engine.wait()
            raise LaunchFailed(f"the engine did not start (exit status {code}); its log above says why")
        self.engine_info = engine_info_json(engine_info_from_json(line))  # checked, then handed on as is

    def _start_worker(self, index: int) -> None:
        assert self.balancer is not None
        fds = self.balancer.worker_fds(index)
        env = {WORKER_INDEX_ENV: str(index), ENGINE_INFO_ENV: self.engine_info.decode(),
               **{name: str(fd) for name, fd in fds.items()}}
        self.balancer.starting(index)
        process = self._spawn("service.http.worker", env, tuple(fds.values()))
        self.balancer.started(index, process.pid)
        self.workers[index] = _Child(process, time.monotonic())

    def _supervise(self) -> int:
        restart_at: dict[int, float] = {}
        while not self.stopping:
            self.balancer.serve(TICK_S)
            if self.engine.poll() is not None:
                log.error("the engine exited (status %s): stopping the workers; exit 1 so the service is restarted",
                          self.engine.returncode)
                self._stop_workers(ENGINE_GONE_EXIT_S)
                return 1
            now = time.monotonic()
            for index, child in list(self.workers.items()):
                if child.process.poll() is None:
                    if now - child.started > STABLE_S:
                        self._failures.pop(index, None)
                    continue
                log.error("worker %d (pid %d) exited with status %s: replacing it", index, child.process.pid,
                          child.process.returncode)
                self._forget(child.process.pid)
                self.balancer.died(index)
                del self.workers[index]
                failures = self._failures.get(index, 0)
                self._failures[index] = failures + 1
                restart_at[index] = now + RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            for index, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[index]
                    self._start_worker(index)
        return 0

    def _forget(self, pid: int) -> None:
        """A dead process's live gauges and any shared memory it left."""
        from prometheus_client import multiprocess  # here: the launcher itself keeps no metrics

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))
        for path in SHM_DIR.glob(f"{ring_prefix(os.getpid())}*.{pid}"):
            path.unlink(missing_ok=True)

    def _stop_workers(self, timeout_s: float) -> None:
        for child in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
            if child.process.poll() is None:
                log.error("worker pid %d did not stop in time: killing it", child.process.pid)
                child.process.kill()
                child.process.wait()

    def _shut_down(self) -> None:
        if self.balancer is not None:
            self.balancer.close()  # no new connection: refused from now on
        if self.listener is not None:
            self.listener.close()
        self._stop_workers(self.settings.drain_timeout_s + 5.0)
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            try:
                self.engine.wait(ENGINE_STOP_S)
            except subprocess.TimeoutExpired:
                log.error("the engine did not stop in %g s: killing it", ENGINE_STOP_S)
                self.engine.kill()
                self.engine.wait()
        for path in SHM_DIR.glob(f"{ring_prefix(os.getpid())}*"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("stopped")


def main(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, "launcher")
    code = Launcher(settings).run()
    logging.shutdown()
    sys.exit(code)
