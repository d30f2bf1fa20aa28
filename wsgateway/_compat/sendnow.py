# -*- test-case-name: tests.unit.compat.test_sendnow -*-
"""
Relayed bytes are sent in the same reactor turn they were read in.

Twisted's TCP transport never sends from ``write()``: it queues the bytes,
registers the socket for writability (an ``epoll_ctl``), sends on the next
turn of the reactor and unregisters again (another ``epoll_ctl``). For a
relay that writes one small chunk per read, that is two extra system calls
and a reactor turn per relayed message, in each direction. Measured with
bench/ scenario a (50 connections, one 64-byte message in flight each), it
was about 40 % of the gateway's CPU per message. Twisted knows the trade-off
(twisted/twisted#5303, "Default transport implementation doesn't write out
bytes immediately"); asyncio's transports send at once when nothing is
queued, and that is what a relay wants: it already writes one chunk per read.

``send_at_once(transport)`` gives one plain TCP transport that behaviour:
when nothing is queued, ``write()`` sends straight away and queues only what
the socket did not take. Everything else (ordering behind queued bytes,
producers paused over ``bufferSize``, errors reported by the next
``doWrite``, TLS) stays Twisted's. Transports of other kinds are left alone.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor


def _write(self: Any, data: bytes) -> None:
    if self.dataBuffer or self._tempDataLen or not self.connected or self._writeDisconnected or not data:
        # queued bytes go first; a closed or half-closed transport drops it
        FileDescriptor.write(self, data)
        return
    try:
        sent = self.socket.send(data)
    except OSError:
        # EAGAIN, or a broken connection, which the queued write's doWrite
        # reports through connectionLost exactly as Twisted always does
        sent = 0
    if sent < len(data):
        FileDescriptor.write(self, data[sent:] if sent else data)


class _Server(tcp.Server):
    write = _write


class _Client(tcp.Client):
    write = _write


# A transport is switched to its subclass, rather than given a bound method
# of its own: no per-connection memory, and no reference cycle keeping a
# closed transport alive until the next full garbage collection.
_SEND_AT_ONCE = {tcp.Server: _Server, tcp.Client: _Client}


def send_at_once(transport: Any) -> None:
    """
    Make ``transport`` (or the TCP transport under a TLS one) send written
    bytes at once when none are queued.
    """
    t = transport
    for _ in range(4):
        if t is None:
            return
        cls = _SEND_AT_ONCE.get(type(t))
        if cls is not None:
            if not t.TLS:
                t.__class__ = cls
            return
        t = getattr(t, "transport", None)
