# -*- test-case-name: tests.unit.handshake.test_pending -*-
"""
One client connection before its request head is read (docs/configuration.md,
C{[limits]}): L{PendingHandshake}, the client's protocol's collaborator
(server.py) for its C{handshake_timeout} timer, its place among the
connections not upgraded yet (C{max_pending_handshakes}, counted per
address by the limiter) or, when its address's share was taken as it
connected, its short grace for sending its request. The set of pending
connections and the limiter are L{wsgateway.handshake.admission}'s.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wsgateway import codes
from wsgateway.connections import LiveConnections
from wsgateway.handshake.chain import HandshakeChain
from wsgateway.relay.transport import transport_of

# How long a connection that found its address's share taken may take to
# send its request (and get its 429): a client sends it right after
# connecting, so a round trip or a TLS handshake, not handshake_timeout.
OVER_SHARE_GRACE = 1.0


class Listener(Protocol):
    """What a pending handshake reads from its listener's factory (server.py), at each use: a reload changes it."""

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def live(self) -> LiveConnections: ...

    @property
    def chain(self) -> HandshakeChain: ...

    @property
    def handshake_timeout(self) -> float: ...

    @property
    def max_pending(self) -> int: ...


class PendingHandshake:
    """
    The connection C{proto} (the client's protocol: what the live
    connections hold and refuse) of C{listener}, from C{begin}, when it
    connects, to C{head_read} or C{lost}. C{log} is the protocol's.
    """

    # one per connection made, however briefly: no __dict__
    __slots__ = ("_head_read", "_listener", "_log", "_over_share", "_proto", "_timer", "ip")

    def __init__(self, proto: Any, listener: Listener, log: Logger) -> None:
        self._proto = proto
        self._listener = listener
        self._log = log
        self._timer: IDelayedCall | None = None
        self._head_read = False
        # the address counted as a pending connection until the request head is read
        self.ip: str | None = None
        # over its address's share when it connected: waiting a short grace for its request
        self._over_share = False

    def begin(self) -> None:
        """The connection is made."""
        listener = self._listener
        # Our own timer: Autobahn's batched timer rounds deadlines down to a
        # whole second, which would drop clients early (at once below 1 s).
        self._timer = listener.clock.callLater(listener.handshake_timeout, self._timed_out)
        live = listener.live
        # Every connection not upgraded yet holds a descriptor: counted per
        # address as an open one, and bounded for the whole gateway.
        ip = listener.chain.pending_address(self._proto.transport)
        if ip is not None and live.limiter.begin_pending(ip) is not None:
            self._wait_over_share()
            return
        self.ip = ip
        self._hold()

    def head_read(self) -> None:
        """The whole request head is read, in time."""
        self._head_read = True
        self._cancel_timer()
        self._end_pending()
        if self._end_over_share():
            # its request came in its grace: the chain refuses it (429) unless a place came free meanwhile
            self._hold()

    def lost(self) -> None:
        """The connection is gone."""
        self._cancel_timer()
        self._end_pending()
        self._end_over_share()

    def drop(self) -> None:
        """Dropped as the oldest connection not upgraded yet (``max_pending_handshakes``)."""
        proto = self._proto
        self._log.debug("dropping {peer}: the oldest of max_pending_handshakes", peer=proto.peer,
                        conn_id=proto.conn_id)
        self._end_pending()
        transport_of(proto).abortConnection()

    def _hold(self) -> None:
        # Oldest out, not newest refused: a flood of idle sockets cannot
        # keep a client that sends its request at once from getting in.
        for oldest in self._listener.live.handshake_started(self._proto, self._listener.max_pending):
            oldest.drop_pending()

    def _wait_over_share(self) -> None:
        """
        Its address's share is taken before it has sent anything. It gets
        its 429 from the chain once its request is read: an answer sent
        before would race the request, and the client would often see the
        TCP reset its request provokes instead. Meanwhile it is no pending
        handshake (so it cannot push out other addresses' ones) and has a
        short grace instead of handshake_timeout; past max_pending such
        connections at once it is dropped at once.
        """
        listener = self._listener
        live = listener.live
        if not live.over_share_started(listener.max_pending):
            live.handshake_refused(self._proto, codes.TOO_MANY_REQUESTS, codes.R_PER_IP_LIMIT, "dropped unanswered")
            transport_of(self._proto).abortConnection()
            return
        self._over_share = True
        self._cancel_timer()
        self._timer = listener.clock.callLater(min(listener.handshake_timeout, OVER_SHARE_GRACE), self._timed_out)

    def _end_over_share(self) -> bool:
        if not self._over_share:
            return False
        self._over_share = False
        self._listener.live.over_share_ended()
        return True

    def _end_pending(self) -> None:
        """The request head is read (``begin`` counts the connection from here) or the connection is gone."""
        if self.ip is not None:
            self._listener.live.limiter.end_pending(self.ip)
            self.ip = None

    def _timed_out(self) -> None:
        self._timer = None
        if not self._head_read:
            self._log.debug("dropping {peer}: no complete upgrade request in time", peer=self._proto.peer)
            transport_of(self._proto).abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
