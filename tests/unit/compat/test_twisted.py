"""
Twisted internals wsgateway relies on (see tests/unit/compat/helpers.py).

Real transports where it matters: a tcp.Server over a loopback socketpair,
driven by hand (a MemoryReactor records what it would poll); TLS in memory
between two TLSMemoryBIOProtocols. No reactor runs, nothing listens.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from twisted.internet import endpoints, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from .helpers import relied_on

LIB = "twisted"

# the in-memory TLS pair loads its test certificate through pyOpenSSL wrappers
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


@pytest.fixture
def server():
    """(tcp.Server on one end of a socketpair, the other end, the MemoryReactor)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactor()
    proto = Recorder()
    t = tcp.Server(ours, proto, ("127.0.0.1", 40000), None, 1, reactor)
    t.repstr = "<compat test transport>"  # set by __init__ only with a Port
    proto.makeConnection(t)
    yield t, peer, reactor
    peer.close()
    ours.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


# -- wsgateway/_compat/sendnow.py: tcp.Server / tcp.Client and FileDescriptor.write ------------------


def test_accepted_and_connected_transports_are_exactly_tcp_server_and_client() -> None:
    # sendnow._SEND_AT_ONCE looks the transport's class up by identity
    with relied_on(LIB, "the transport classes of TCP connections (tcp.Port.transport, Connector -> tcp.Client)",
                   "wsgateway/_compat/sendnow.py"):
        assert tcp.Port.transport is tcp.Server
        reactor = MemoryReactorClock()
        client = tcp.Connector("127.0.0.1", 9, Factory.forProtocol(Protocol), 30, None, reactor)._makeTransport()
        try:
            assert type(client) is tcp.Client
        finally:
            client.socket.close()


@pytest.mark.parametrize("name", ["dataBuffer", "_tempDataLen", "connected", "_writeDisconnected", "socket", "TLS"])
def test_tcp_server_has_what_sendnow_reads(server, name: str) -> None:
    t, _, _ = server
    expected = {"dataBuffer": b"", "_tempDataLen": 0, "connected": 1, "_writeDisconnected": False, "TLS": False}
    with relied_on(LIB, f"tcp.Server.{name}", "wsgateway/_compat/sendnow.py"):
        value = getattr(t, name)
        if name == "socket":
            assert isinstance(value, socket.socket) and callable(value.send)
        else:
            assert value == expected[name], f"a fresh connection's {name} is {value!r}, not {expected[name]!r}"


@pytest.mark.parametrize("name", ["dataBuffer", "_tempDataLen", "_writeDisconnected", "socket", "TLS"])
def test_tcp_client_has_what_sendnow_reads(name: str) -> None:
    reactor = MemoryReactorClock()
    client = tcp.Connector("127.0.0.1", 9, Factory.forProtocol(Protocol), 30, None, reactor)._makeTransport()
    try:
        with relied_on(LIB, f"tcp.Client.{name}", "wsgateway/_compat/sendnow.py"):
            value = getattr(client, name)
            if name == "socket":
                assert isinstance(value, socket.socket)
            else:
                assert not value, f"a new client's {name} is {value!r}"
    finally:
        client.socket.close()


def test_client_and_server_share_one_write_and_it_is_filedescriptor_write_when_not_tls() -> None:
    with relied_on(LIB, "tcp.Server.write / tcp.Client.write (one implementation, FileDescriptor.write unless TLS)",
                   "wsgateway/_compat/sendnow.py"):
        assert tcp.Server.write is tcp.Client.write
        assert "TLS" in tcp.Server.write.__code__.co_names
        assert "FileDescriptor" in tcp.Server.write.__code__.co_names or tcp.Server.write is FileDescriptor.write


def test_filedescriptor_write_queues_and_sends_on_dowrite(server) -> None:
    t, peer, reactor = server
    with relied_on(LIB, "FileDescriptor.write (queues in _tempDataBuffer/_tempDataLen, sends on doWrite)",
                   "wsgateway/_compat/sendnow.py"):
        FileDescriptor.write(t, b"abc")
        assert _recv(peer) == b"", "write() sent at once: Twisted may now do what wsgateway/_compat/sendnow.py does"
        assert t._tempDataLen == 3
        assert t in reactor.getWriters()
        t.write(b"def")  # the transport's own write: also queued
        assert t._tempDataLen == 6 and _recv(peer) == b""
        assert t.doWrite() is None
        assert _recv(peer) == b"abcdef"
        assert not t.dataBuffer and not t._tempDataLen, "nothing left queued must read as empty"
        assert t not in reactor.getWriters()


def test_write_after_lose_write_connection_is_dropped(server) -> None:
    t, peer, _ = server
    with relied_on(LIB, "FileDescriptor._writeDisconnected (set by loseWriteConnection; write then drops)",
                   "wsgateway/_compat/sendnow.py"):
        t.loseWriteConnection()
        t.doWrite()  # nothing queued: the write side is shut down now
        assert t._writeDisconnected is True
        FileDescriptor.write(t, b"late")
        assert not t._tempDataLen


def test_start_tls_sets_the_tls_flag(server) -> None:
    from twisted.internet.ssl import CertificateOptions

    t, _, _ = server
    with relied_on(LIB, "tcp.Connection.TLS (True once startTLS wraps the transport)", "wsgateway/_compat/sendnow.py"):
        t.startTLS(CertificateOptions())
        assert t.TLS is True
        t.write(b"plaintext")
        assert b"plaintext" not in t.dataBuffer + b"".join(t._tempDataBuffer)


def test_send_at_once_on_a_real_transport(server) -> None:
    # the whole of wsgateway/_compat/sendnow.py against this Twisted: at once when idle, in order when not
    from wsgateway._compat.sendnow import send_at_once

    t, peer, reactor = server
    with relied_on(LIB, "tcp.Server's write path (send_at_once no longer sends at once, or reorders)",
                   "wsgateway/_compat/sendnow.py"):
        send_at_once(t)
        assert type(t) is not tcp.Server and isinstance(t, tcp.Server)
        t.write(b"now")
        assert _recv(peer) == b"now"
        FileDescriptor.write(t, b"1")
        t.write(b"2")
        assert _recv(peer) == b""
        t.doWrite()
        assert _recv(peer) == b"12"


# -- upstreamleg.adopt: where Twisted holds a connection's protocol -----------------


def test_tcp_transport_reads_into_whatever_its_protocol_attribute_is(server) -> None:
    t, peer, _ = server
    other = Recorder()
    with relied_on(LIB, "tcp.Connection.protocol (read at each doRead / connectionLost)", "wsgateway/upstream/leg.py"):
        t.protocol = other
        peer.send(b"x")
        t.doRead()
        assert other.received == [b"x"]
        t.connectionLost(Failure(ConnectionDone()))
        assert len(other.lost) == 1


def test_endpoint_wrapping_protocol_forwards_to_its_wrapped_protocol_attribute() -> None:
    from wsgateway.upstream.leg import adopt

    reactor = MemoryReactor()
    built: list[Recorder] = []

    class Building(Factory):
        def buildProtocol(self, addr):
            built.append(Recorder())
            return built[-1]

    with relied_on(LIB, "endpoints._WrappingProtocol._wrappedProtocol (TCP4ClientEndpoint's wrapper)",
                   "wsgateway/upstream/leg.py"):
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", 9).connect(Building())
        holder = reactor.tcpClients[0][2].buildProtocol(None)
        assert isinstance(holder, endpoints._WrappingProtocol)
        transport = StringTransport()
        transport.protocol = holder  # as tcp.Connection holds it
        holder.makeConnection(transport)
        proto = built[0]
        assert holder._wrappedProtocol is proto and proto.transport is transport
        leg = Recorder()
        assert adopt(proto, leg)
        holder.dataReceived(b"y")
        holder.connectionLost(Failure(ConnectionDone()))
        assert leg.received == [b"y"] and len(leg.lost) == 1 and proto.received == []


def _tls_pair(server_factory: Factory, creator):
    import trustme
    from twisted.internet import ssl
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOFactory

    clock = Clock()  # small writes are sent on a later turn (26.x): this clock is that turn

    def tls_factory(*args):
        try:
            return TLSMemoryBIOFactory(*args, clock=clock)
        except TypeError:  # no clock parameter: small writes go out at once
            return TLSMemoryBIOFactory(*args)

    ca = trustme.CA()
    client_opts = ssl.optionsForClientTLS("example.test", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes()))
    server_opts = ssl.PrivateCertificate.loadPEM(
        ca.issue_cert("example.test").private_key_and_cert_chain_pem.bytes()
    ).options()
    creator.options = server_opts
    sp = tls_factory(creator, False, server_factory).buildProtocol(None)
    cp = tls_factory(client_opts, True, Factory.forProtocol(Protocol)).buildProtocol(None)
    st, ct = StringTransport(), StringTransport()
    sp.makeConnection(st)
    cp.makeConnection(ct)

    def pump() -> None:
        for _ in range(50):
            clock.advance(0)
            a, b = ct.value(), st.value()
            if not a and not b:
                return
            ct.clear()
            st.clear()
            if a:
                sp.dataReceived(a)
            if b:
                cp.dataReceived(b)

    pump()
    return sp, cp, pump


class _Creator:
    """Only serverConnectionForTLS, as wsgateway.tls.ReloadableServerTLS."""

    def __init__(self) -> None:
        self.calls = 0
        self.options = None

    def serverConnectionForTLS(self, tls_protocol):
        self.calls += 1
        return self.options.serverConnectionForTLS(tls_protocol)


def test_tls_wrapper_forwards_to_its_wrapped_protocol_attribute() -> None:
    from zope.interface import directlyProvides
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator

    from wsgateway.upstream.leg import adopt

    creator = _Creator()
    directlyProvides(creator, IOpenSSLServerConnectionCreator)
    with relied_on(LIB, "TLSMemoryBIOProtocol.wrappedProtocol (read at each decrypted read)",
                   "wsgateway/upstream/leg.py"):
        sp, cp, pump = _tls_pair(Factory.forProtocol(Recorder), creator)
        proto = sp.wrappedProtocol
        assert isinstance(proto, Recorder) and proto.transport is sp
        leg = Recorder()
        assert adopt(proto, leg)
        cp.write(b"hello")
        pump()
        sp.connectionLost(Failure(ConnectionDone()))
        assert b"".join(leg.received) == b"hello" and len(leg.lost) == 1 and proto.received == []


def test_tls_factory_asks_a_server_connection_creator_once_per_connection() -> None:
    from zope.interface import directlyProvides
    from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
    from twisted.internet.ssl import CertificateOptions

    creator = _Creator()
    directlyProvides(creator, IOpenSSLServerConnectionCreator)
    with relied_on(LIB, "TLSMemoryBIOFactory with an IOpenSSLServerConnectionCreator (no getContext)",
                   "wsgateway/tls.py, wsgateway/workers/child.py"):
        assert IOpenSSLServerConnectionCreator.implementedBy(CertificateOptions)
        sp, cp, pump = _tls_pair(Factory.forProtocol(Recorder), creator)
        assert creator.calls == 1
        cp.write(b"ok")
        pump()
        assert b"".join(sp.wrappedProtocol.received) == b"ok"


# -- wsgateway/service.py / wsgateway/workers/parent.py: reactor._exitSignal ----------------------------------


def test_exit_signal_is_set_by_the_reactor_and_read_by_twistd() -> None:
    from types import SimpleNamespace

    from twisted.application import app
    from twisted.internet import reactor as installed_reactor  # whichever pytest-twisted installed
    from twisted.internet.base import ReactorBase
    from twisted.scripts import twistd

    with relied_on(LIB, "reactor._exitSignal (set by sigTerm, re-raised by twistd at exit)",
                   "wsgateway/service.py, wsgateway/workers/parent.py"):
        assert ReactorBase._exitSignal is None
        assert isinstance(installed_reactor, ReactorBase) and hasattr(installed_reactor, "_exitSignal")
        r = SimpleNamespace(callFromThread=lambda f, *a: None, stop=lambda: None, _exitSignal=None)
        ReactorBase.sigTerm(r, signal.SIGTERM, None)
        assert r._exitSignal == signal.SIGTERM
        # twistd copies it after the reactor stops, then kills itself with it
        assert "_exitSignal" in app.ApplicationRunner.startReactor.__code__.co_names
        assert "_exitSignal" in twistd.runApp.__code__.co_names
        assert callable(app._exitWithSignal)


# -- wsgateway/tls.py / wsgateway/workers/child.py: StreamServerEndpointService._raiseSynchronously ----------


def test_raise_synchronously_makes_a_failed_listen_raise() -> None:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.error import CannotListenError

    class Refusing:
        def listen(self, factory):
            return fail(CannotListenError("127.0.0.1", 1, OSError(errno.EADDRINUSE, "in use")))

    with relied_on(LIB, "StreamServerEndpointService._raiseSynchronously", "wsgateway/tls.py, wsgateway/workers/child.py"):
        assert StreamServerEndpointService._raiseSynchronously is False
        service = StreamServerEndpointService(Refusing(), Factory())
        service._raiseSynchronously = True
        with pytest.raises(CannotListenError):
            service.privilegedStartService()


# -- wsgateway/workers/child.py: twisted.internet.main.CONNECTION_DONE from doRead ------------------


def test_a_reader_returning_connection_done_gets_connection_lost() -> None:
    from twisted.internet import main
    from twisted.internet.pollreactor import PollReactor

    from wsgateway.workers.child import ParentWatch

    gone: list[bool] = []
    r, w = os.pipe()
    reactor = PollReactor()
    try:
        with relied_on(LIB, "twisted.internet.main.CONNECTION_DONE (returned by doRead: the reactor disconnects)",
                       "wsgateway/workers/child.py"):
            assert isinstance(main.CONNECTION_DONE, ConnectionDone)
            watch = ParentWatch(reactor, r, lambda: gone.append(True))
            os.close(w)
            w = -1
            for _ in range(10):
                reactor.doIteration(0.1)
                if gone:
                    break
            assert gone == [True] and watch not in reactor.getReaders()
    finally:
        reactor.removeAll()
        for fd in (r, w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        reactor.waker.connectionLost(None) if hasattr(reactor, "waker") else None


# -- wsgateway/workers/aggregate.py: _HTTP11ClientFactory and HTTPConnectionPool._factory ------------


def test_connection_pool_builds_its_factory_from_the_pool_factory_attribute() -> None:
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    from wsgateway.workers.aggregate import _QuietFactory

    class Capturing:
        factory = None

        def connect(self, factory):
            self.factory = factory
            return Deferred()

    with relied_on(LIB, "twisted.web.client._HTTP11ClientFactory / HTTPConnectionPool._factory",
                   "wsgateway/workers/aggregate.py"):
        pool = HTTPConnectionPool(MemoryReactorClock(), persistent=False)
        assert pool._factory is _HTTP11ClientFactory
        assert issubclass(_HTTP11ClientFactory, Factory) and hasattr(_HTTP11ClientFactory, "noisy")
        pool._factory = _QuietFactory
        endpoint = Capturing()
        pool.getConnection(("http", b"worker", 80), endpoint)
        assert isinstance(endpoint.factory, _QuietFactory) and endpoint.factory.noisy is False


# -- wsgateway/ops/admin.py / wsgateway/workers/admin.py: Request._disconnected ---------------------------------


def test_request_disconnected_is_set_when_the_connection_is_lost() -> None:
    from twisted.web.http import HTTPChannel
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    with relied_on(LIB, "twisted.web Request._disconnected", "wsgateway/ops/admin.py, wsgateway/workers/admin.py"):
        channel = HTTPChannel()
        channel.site = Site(Resource())
        channel.makeConnection(StringTransport())
        request = Request(channel, False)
        assert request._disconnected is False
        request.connectionLost(Failure(ConnectionDone()))
        assert request._disconnected is True and not request.finished


# -- wsgateway/config/listen.py: serverFromString with no reactor ------------------------------------


def test_server_from_string_parses_without_a_reactor() -> None:
    with relied_on(LIB, "endpoints.serverFromString(None, ...) (parses, never touches the reactor)",
                   "wsgateway/config/listen.py"):
        ep = endpoints.serverFromString(None, "tcp:0:interface=127.0.0.1:backlog=511")
        assert isinstance(ep, endpoints.TCP4ServerEndpoint)
        with pytest.raises((ValueError, KeyError, TypeError)):
            endpoints.serverFromString(None, "nosuchkind:1")


# -- twisted/plugins/wsgateway_plugin.py: a plugins folder with no __init__.py ------


def test_twisted_plugins_folders_without_init_are_searched() -> None:
    from twisted.plugin import pluginPackagePaths

    root = Path(__file__).resolve().parents[3]
    with relied_on(LIB, "twisted.plugin.pluginPackagePaths (twisted/plugins folders without __init__.py)",
                   "twisted/plugins/wsgateway_plugin.py"):
        saved = list(sys.path)
        try:
            sys.path.insert(0, str(root))
            paths = pluginPackagePaths("twisted.plugins")
        finally:
            sys.path[:] = saved
        assert str(root / "twisted" / "plugins") in paths
