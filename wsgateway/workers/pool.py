# -*- test-case-name: tests.integration.test_workers -*-
"""
The worker processes of a parent (L{wsgateway.workers.parent}): L{WorkerPool}
starts each with the shared sockets, puts its output lines into the
parent's log (L{WorkerOutput}), replaces one that dies (after 0.5 s, doubling
up to 30 s while replacements keep dying within 10 s of their start),
forwards signals and stops them all.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

import wsgateway
from wsgateway import sdnotify
from wsgateway.backoff import exponential
from wsgateway.ops import logs
from wsgateway.workers import aggregate
from wsgateway.workers.child import ENV, FIRST_FD, WorkerSetup

__all__ = ["PoolOwner", "WorkerOutput", "WorkerPool", "WorkerSlot", "describe_exit"]

RESTART_INITIAL = 0.5  # seconds before a dead worker's replacement starts
RESTART_MAX = 30.0  # the cap while replacements keep dying young
STABLE_AFTER = 10.0  # a worker that lived this long starts the backoff afresh
MAX_LINE = 1024 * 1024  # a worker's output line longer than this is cut

# The worker imports this very wsgateway: not "python -m wsgateway.workers.child",
# which would look in the current folder first (twistd's, maybe holding
# another checkout), nor a PYTHONPATH that an installed copy could follow.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(wsgateway.__file__)))
BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from wsgateway.workers.child import main; sys.exit(main())"


class PoolOwner(Protocol):
    """What the pool needs of the parent (``parent.WorkerParent``)."""

    reactor: Any
    sockets: list[socket.socket]  # bound before the pool starts
    config_path: str
    aggregate: aggregate.MetricsAggregate
    restarts: Any  # the wsgateway_worker_restarts Counter

    def setup(self, worker: int) -> WorkerSetup: ...


def describe_exit(reason: Any) -> str:
    signum = getattr(reason, "signal", None)
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with status {getattr(reason, 'exitCode', None)}"


class WorkerSlot:
    """Worker number ``id``: its current process, if any, and its history."""

    def __init__(self, id: int, client: aggregate.WorkerClient) -> None:
        self.id = id
        self.client = client
        self.process: Any = None  # IProcessTransport while it runs
        self.pid: int | None = None
        self.started = 0.0
        self.restarts = 0
        self.young_deaths = 0
        self.pending: Any = None  # the IDelayedCall of a replacement

    @property
    def alive(self) -> bool:
        return self.process is not None


class WorkerOutput(ProcessProtocol):
    """A worker's stdout lines into the parent's log as they are; its stderr lines as warnings."""

    log = Logger()

    def __init__(self, ended: Callable[[WorkerOutput, Any], None], worker: int) -> None:
        self.ended = ended
        self.worker = worker
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out = self._lines(self._out + data, logs.relay)

    def errReceived(self, data: bytes) -> None:
        self._err = self._lines(self._err + data, self._stderr)

    def _stderr(self, line: str) -> None:
        if line.strip():
            self.log.warn("worker {worker} stderr: {line}", worker=self.worker, line=line)

    @staticmethod
    def _lines(buffer: bytes, emit: Callable[[str], None]) -> bytes:
        *lines, rest = buffer.split(b"\n")
        for line in lines:
            emit(line.decode("utf-8", "replace"))
        if len(rest) > MAX_LINE:
            emit(rest.decode("utf-8", "replace"))
            rest = b""
        return rest

    def processEnded(self, reason: Failure) -> None:
        for rest, emit in ((self._out, logs.relay), (self._err, self._stderr)):
            if rest:
                emit(rest.decode("utf-8", "replace"))
        self._out = self._err = b""
        self.ended(self, reason.value)


class WorkerPool:
    """Starts, watches, signals and stops the worker processes."""

    log = Logger()

    def __init__(self, parent: PoolOwner) -> None:
        self.parent = parent
        self.reactor = parent.reactor
        self.slots: list[WorkerSlot] = []
        self.stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.pending = None
        if self.stopping:
            return
        setup = self.parent.setup(slot.id)
        try:
            os.unlink(setup.control)  # a dead predecessor's socket file
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        env[ENV] = setup.to_env()
        # systemd hears from the parent alone (NotifyAccess=main would drop a worker's READY=1 anyway)
        env.pop(sdnotify.ENV, None)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for index, sock in enumerate(self.parent.sockets):
            child_fds[FIRST_FD + index] = sock.fileno()
        args = [sys.executable, "-c", BOOT, PACKAGE_ROOT, "--id", str(slot.id), self.parent.config_path]
        protocol = WorkerOutput(lambda p, reason: self._ended(slot, p, reason), slot.id)
        try:
            process = self.reactor.spawnProcess(protocol, sys.executable, args, env=env, childFDs=child_fds)
        except Exception:
            self.log.failure("worker {worker} could not be started", worker=slot.id)
            self._schedule(slot, young=True)
            return
        slot.process, slot.pid, slot.started = process, process.pid, self.reactor.seconds()
        if slot.restarts:
            self.log.info("worker {worker} started again: pid {pid} (restart {restarts})", worker=slot.id,
                          pid=process.pid, restarts=slot.restarts)
        else:
            self.log.info("worker {worker} started: pid {pid}", worker=slot.id, pid=process.pid)

    def _ended(self, slot: WorkerSlot, protocol: WorkerOutput, reason: Any) -> None:
        if slot.process is None or slot.process is not protocol.transport:
            return
        pid, lived = slot.pid, self.reactor.seconds() - slot.started
        slot.process = slot.pid = None
        if pid is not None:
            self.parent.aggregate.retire(pid)
        how = describe_exit(reason)
        if self.stopping:
            self.log.info("worker {worker} (pid {pid}) {how}", worker=slot.id, pid=pid, how=how)
            return
        delay = self._schedule(slot, young=lived < STABLE_AFTER)
        self.log.error("worker {worker} (pid {pid}) {how} after {lived:.1f} s; a replacement starts in {delay:.1f} s",
                       worker=slot.id, pid=pid, how=how, lived=lived, delay=delay)

    def _schedule(self, slot: WorkerSlot, *, young: bool) -> float:
        slot.young_deaths = slot.young_deaths + 1 if young else 1
        delay = exponential(slot.young_deaths - 1, initial=RESTART_INITIAL, maximum=RESTART_MAX)
        slot.restarts += 1
        self.parent.restarts.inc()
        slot.pending = self.reactor.callLater(delay, self._spawn, slot)
        return delay

    def signal_all(self, name: str) -> int:
        """Send SIGname to every running worker; how many got it."""
        sent = 0
        for slot in self.slots:
            if slot.alive:
                try:
                    slot.process.signalProcess(name)
                    sent += 1
                except error.ProcessExitedAlready:
                    pass
        return sent

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every worker; wait ``timeout`` seconds for them to drain and exit, then kill the rest."""
        self.stopping = True
        for slot in self.slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
        self.signal_all("TERM")
        deadline = self.reactor.seconds() + timeout
        while any(s.alive for s in self.slots) and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)
        left = [s.id for s in self.slots if s.alive]
        if left:
            self.log.warn("workers {left} still running {timeout} s after SIGTERM: killing them",
                          left=", ".join(map(str, left)), timeout=timeout)
            self.signal_all("KILL")
            deadline = self.reactor.seconds() + 5.0
            while any(s.alive for s in self.slots) and self.reactor.seconds() < deadline:
                await deferLater(self.reactor, 0.05)
