# -*- test-case-name: tests.integration.test_proxy -*-
"""
The upstream leg of a proxied connection: the gateway as an Autobahn
WebSocket client of one upstream node (``UpstreamProtocol``), one connection
attempt (``UpstreamConnector``), and ``adopt``, which hands an open leg's
transport to the frame relay once both handshakes are done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateResponseAccept
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgateway._compat import autobahn as _autobahn
from wsgateway.relay.transport import Leg, transport_of
from wsgateway.upstream.compression import Deflate, accepted, from_autobahn
from wsgateway.upstream.errors import describe_failure
from wsgateway.upstream.pool import Node, UpstreamRefused, UpstreamRequest

OPEN = WebSocketProtocol.STATE_OPEN

# what an opened upstream leg may send before anyone relays it, unpaused
_PENDING_LIMIT = 65536


class UpstreamFailed(Exception):
    """The upstream leg closed or failed before its handshake completed."""


class UpstreamProtocol(WebSocketClientProtocol):
    """The gateway as a WebSocket client of one upstream node."""

    request: ConnectingRequest
    opened: Deferred[UpstreamProtocol] | None = None
    pending: bytes = b""
    lost: bool = False
    refused_status: int | None = None
    # the relay's Leg, when adopt() did not know this transport and the
    # protocol stays in place, forwarding to it
    sink: Leg | None = None
    _paused = False
    # the client's permessage-deflate offers this leg passed on, and the
    # upstream's answer once checked against them (upstream/compression.py)
    deflate_offers: tuple[Deflate, ...] = ()
    deflate: Deflate | None = None

    def accept_deflate(self, response: Any) -> PerMessageDeflateResponseAccept | None:
        """
        Autobahn's ``perMessageCompressionAccept`` for a leg that passed offers
        on: an answer RFC 7692 allows to one of them is accepted; any other
        fails the handshake, and the client gets 502.
        """
        answer = from_autobahn(response)
        if not accepted(self.deflate_offers, answer):
            return None
        self.deflate = answer
        return PerMessageDeflateResponseAccept(response)

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        return self.request

    def onOpen(self) -> None:
        # Bytes after the 101 in the same read (an upstream that speaks
        # first) must reach the client: keep them for the relay. The client
        # leg normally opens in this same call chain, so the upstream is
        # paused only if it sends more than _PENDING_LIMIT before that
        # (pausing and resuming every leg cost 4 % of a handshake's CPU).
        self.pending, self.data = self.data, b""
        self._bound_pending()
        d, self.opened = self.opened, None
        if d is not None:
            d.callback(self)

    def failHandshake(self, reason: str) -> None:
        line = getattr(self, "http_status_line", None) or ""
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            status = int(parts[1])
            if status != 101 and 200 <= status <= 599:
                self.refused_status = status
        super().failHandshake(reason)

    def dataReceived(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.dataReceived(data)
        elif self.state == OPEN:
            self.pending += data
            self._bound_pending()
        else:
            self._dataReceived(data)

    def _bound_pending(self) -> None:
        if len(self.pending) > _PENDING_LIMIT and not self._paused:
            self._paused = True
            transport_of(self).pauseProducing()

    def take_pending(self) -> bytes:
        """What the upstream sent after its 101, for whoever reads this leg now; reading goes on."""
        pending, self.pending = self.pending, b""
        if self._paused:
            self._paused = False
            transport_of(self).resumeProducing()
        return pending

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.sink is not None:
            self.sink.connectionLost(reason)
        else:
            d, self.opened = self.opened, None
            if d is not None:
                if self.refused_status is not None:
                    d.errback(UpstreamRefused(self.refused_status))
                else:
                    d.errback(UpstreamFailed(
                        f"connection closed during the upstream handshake ({describe_failure(reason)})"
                    ))
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        pass


class _FactoryView:
    """
    The shared client factory as one connection sees it: Autobahn checks the
    upstream's chosen subprotocol against ``factory.protocols``, which must be
    what this client offered.
    """

    __slots__ = ("_shared", "protocols")

    def __init__(self, shared: WebSocketClientFactory, protocols: list[str]) -> None:
        self._shared = shared
        self.protocols = protocols

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)


class _LegFactory(Factory):
    """Hands one connection's handshake parameters to the shared Autobahn factory's protocol."""

    noisy = False

    def __init__(self, shared: WebSocketClientFactory, request: ConnectingRequest, opened: Deferred[Any],
                 deflate_offers: tuple[Deflate, ...] = ()) -> None:
        self.shared = shared
        self.deflate_offers = deflate_offers
        # None once the attempt is over (UpstreamConnector.connect's release)
        self.request: ConnectingRequest | None = request
        self.opened: Deferred[Any] | None = opened
        self.built: UpstreamProtocol | None = None

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        request = self.request
        assert request is not None, "built after the attempt was over"
        p = self.shared.buildProtocol(addr)
        assert isinstance(p, UpstreamProtocol)  # the shared factory's protocol (UpstreamConnector._factory)
        p.factory = _FactoryView(self.shared, request.protocols)
        p.request = request
        p.opened = self.opened
        if self.deflate_offers:
            # an instance attribute: Autobahn copies its factory's (declining) one only where there is none
            p.deflate_offers = self.deflate_offers
            setattr(p, "perMessageCompressionAccept", p.accept_deflate)  # Autobahn's option, untyped
        self.built = p
        return p


class UpstreamConnector:
    """Opens one WebSocket connection to one node (a single attempt)."""

    log = Logger()

    def __init__(self, reactor: Any, endpoints: Callable[[Node, float], Any]) -> None:
        self._reactor = reactor
        self._endpoint_for = endpoints
        self._factories: dict[str, WebSocketClientFactory] = {}

    def _factory(self, node: Node) -> WebSocketClientFactory:
        f = self._factories.get(node.url)
        if f is None:
            cfg = node.config
            f = WebSocketClientFactory(f"{cfg.scheme}://{_host_for_url(cfg.host)}:{cfg.port}", reactor=self._reactor)
            f.protocol = UpstreamProtocol
            f.noisy = False
            f.setProtocolOptions(
                version=13,
                perMessageCompressionOffers=[],
                autoPingInterval=0,
                openHandshakeTimeout=0,
                closeHandshakeTimeout=0,
                failByDrop=True,
                tcpNoDelay=True,
            )
            _autobahn.preset_options(f)
            self._factories[node.url] = f
        return f

    def connect(self, node: Node, req: UpstreamRequest, timeout: float) -> Deferred[UpstreamProtocol]:
        cfg = node.config
        creq = ConnectingRequest(
            host=_host_for_url(cfg.host),
            port=cfg.port,
            resource=req.resource,
            headers=req.headers,
            useragent=req.useragent,
            origin=req.origin,
            protocols=list(req.protocols),
        )

        def cancel(_: Deferred[Any]) -> None:
            connecting.cancel()
            built = factory.built
            if built is not None and built.transport is not None:
                transport_of(built).abortConnection()

        opened: Deferred[UpstreamProtocol] = Deferred(cancel)
        factory = _LegFactory(self._factory(node), creq, opened, req.deflate_offers)
        connecting = self._endpoint_for(node, timeout).connect(factory)

        def failed(f: Failure) -> None:
            if not opened.called:
                opened.errback(f)

        def release(result: Any) -> Any:
            # The endpoint's wrapping factory lives as long as the TCP
            # connection; it must not keep the handshake objects alive too.
            factory.built = factory.opened = factory.request = None
            return result

        # the connect Deferred's result would otherwise hold the protocol
        connecting.addCallbacks(lambda _: None, failed)
        opened.addBoth(release)
        return opened


def adopt(proto: Any, leg: Any) -> bool:
    """
    Make ``leg`` the protocol of ``proto``'s connection, wherever Twisted
    holds it: a TCP transport's ``protocol``, a TLS wrapper's
    ``wrappedProtocol``, or an endpoint's wrapping protocol. False when the
    transport is of a kind not known here (then ``proto`` keeps forwarding).
    """
    t = proto.transport
    if getattr(t, "wrappedProtocol", None) is proto:
        t.wrappedProtocol = leg
        return _retired(proto)
    holder = getattr(t, "protocol", None)
    if holder is proto:
        t.protocol = leg
        return _retired(proto)
    if holder is not None and getattr(holder, "_wrappedProtocol", None) is proto:
        holder._wrappedProtocol = leg
        return _retired(proto)
    return False


def _retired(proto: Any) -> bool:
    """
    ``proto`` hears nothing more from its connection: drop the reference
    cycle it forms with itself when it passed deflate offers on (its
    ``perMessageCompressionAccept`` is its own bound method), so that it is
    freed with the handshake rather than at the next full garbage
    collection. (Not its is_open Deferred: Autobahn resolves it after onOpen,
    where adoption happens.)
    """
    vars(proto).pop("perMessageCompressionAccept", None)
    return True


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
