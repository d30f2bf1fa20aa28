# -*- test-case-name: tests.unit.core.test_sdnotify, tests.integration.test_sdnotify -*-
"""
systemd's notify protocol (``Type=notify``, sd_notify(3)), without libsystemd:
one datagram per state change to the AF_UNIX socket named by
``$NOTIFY_SOCKET``:

- ``READY=1`` once the gateway serves (every listener bound; with workers,
  every worker answering: ``wsgateway.workers.parent``);
- ``RELOADING=1`` with ``MONOTONIC_USEC`` at the start of a SIGHUP reload
  (``Type=notify-reload`` requires the timestamp; ``Type=notify`` ignores
  it), then ``READY=1`` when it is done, with ``STATUS=`` saying why when
  it was rejected;
- ``STOPPING=1`` when the SIGTERM drain starts.

Without ``$NOTIFY_SOCKET`` (not under systemd, or a worker process: the
parent takes it out of their environment) every call is a no-op. Sending
never blocks and never raises into the gateway: a lost notification costs
systemd's view of the state, never the gateway its work; the first failure
is logged as a warning, the rest silently.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

__all__ = ["ENV", "Notifier", "address", "message", "ready_when"]

ENV = "NOTIFY_SOCKET"


def address(value: str) -> str | bytes | None:
    """
    The ``sendto`` address of a ``$NOTIFY_SOCKET`` value: a path, or for a
    leading ``@`` the abstract namespace (bytes starting with NUL); None for
    what AF_UNIX cannot reach (empty, relative, ``vsock:``...).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def message(*fields: tuple[str, str]) -> bytes:
    """``KEY=value`` lines, newline-separated, as sd_notify(3) reads them; a value is kept to one line."""
    return "\n".join(f"{key}={' '.join(value.splitlines())}" for key, value in fields).encode()


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what systemd compares RELOADING=1's MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """
    The gateway's notifications, in the order systemd expects: nothing
    before the first READY=1 but STOPPING=1, no READY=1 after STOPPING=1
    (a SIGHUP before the gateway is ready, or a listener bound late during
    the drain, must not tell systemd it serves).
    """

    log = Logger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get(ENV, "")
        self.target = address(value) if value else None
        self._warned = False
        if value and self.target is None:
            self._warn("${env} = {value!r} is not an AF_UNIX socket address; systemd will not hear from the gateway",
                       value=value)
        self.ready_sent = False
        self.stopping_sent = False
        self._status = False  # a rejected reload's STATUS= is showing

    def ready(self) -> None:
        """The gateway serves: READY=1, once."""
        if self.ready_sent or self.stopping_sent:
            return
        self.ready_sent = True
        self.send(("READY", "1"))

    def reloading(self) -> None:
        """A SIGHUP reload starts."""
        if self.ready_sent and not self.stopping_sent:
            self.send(("RELOADING", "1"), ("MONOTONIC_USEC", str(monotonic_usec())))

    def reloaded(self, *, config_ok: bool = True, certificates_ok: bool = True) -> None:
        """The reload is done, taken or rejected (STATUS= says which part): serving again."""
        if not self.ready_sent or self.stopping_sent:
            return
        problem = None
        if not config_ok:
            problem = "reload rejected: the configuration was not taken (see the log); running the previous one"
        elif not certificates_ok:
            problem = "reload: a TLS certificate could not be reloaded (see the log); it keeps the previous one"
        if problem:
            self._status = True
            self.send(("READY", "1"), ("STATUS", problem))
        elif self._status:
            # an empty STATUS= clears what a rejected reload left in `systemctl status`
            self._status = False
            self.send(("READY", "1"), ("STATUS", ""))
        else:
            self.send(("READY", "1"))

    def stopping(self) -> None:
        """The drain starts."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.send(("STOPPING", "1"))

    def send(self, *fields: tuple[str, str]) -> bool:
        """One datagram; False when there is nowhere to send it or it could not be sent."""
        if self.target is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # systemd reads the socket at once; a full queue drops this
                # notification rather than stall the reactor
                sock.setblocking(False)
                sock.sendto(message(*fields), self.target)
            return True
        except Exception as e:
            self._warn("could not notify systemd through ${env} ({error}); further failures are not logged",
                       error=e)
            return False

    def _warn(self, fmt: str, **kw: object) -> None:
        if not self._warned:
            self._warned = True
            self.log.warn(fmt, env=ENV, **kw)


def ready_when(notifier: Notifier, bound: Iterable[Deferred[Any]], reactor: Any) -> None:
    """READY=1 once every one of ``bound`` (listeners' ``when_bound``) has fired and the reactor runs."""
    gatherResults(list(bound)).addCallback(lambda _: reactor.callWhenRunning(notifier.ready))
