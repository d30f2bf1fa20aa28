"""
Autobahn internals wsgateway relies on (see tests/unit/compat/helpers.py).

Protocols run over StringTransports with a task.Clock: a whole opening
handshake in memory, no reactor, no network.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import inspect
import pprint
import re

import pytest
from autobahn.twisted import websocket as tx_websocket
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket import protocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from .helpers import relied_on

LIB = "autobahn"
MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = base64.b64encode(b"0123456789abcdef")


class Transport(StringTransport):
    """A StringTransport that, like a TCP transport, lets Autobahn unregister no producer."""

    def unregisterProducer(self) -> None:
        self.producer = None


def head(target: str = "/chat?x=1", extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def masked_text(payload: bytes) -> bytes:
    mask = b"abcd"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def server(cls: type[WebSocketServerProtocol] = WebSocketServerProtocol):
    factory = WebSocketServerFactory(reactor=Clock())
    factory.protocol = cls
    p = factory.buildProtocol(None)
    t = Transport()
    p.makeConnection(t)
    return p, t


def client(cls: type[WebSocketClientProtocol], protocols: list[str] | None = None):
    factory = WebSocketClientFactory("ws://up.example:80", reactor=Clock())
    factory.protocol = cls
    factory.protocols = protocols or []
    p = factory.buildProtocol(None)
    t = Transport()
    p.makeConnection(t)
    return p, t


def accept(request: bytes, protocol_line: str = "") -> bytes:
    key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1)
    accept_ = base64.b64encode(hashlib.sha1(key + MAGIC).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_ + b"\r\n" + protocol_line.encode() + b"\r\n")


class Client(WebSocketClientProtocol):
    offered: list[str] = []

    def onConnecting(self, transport_details):
        return ConnectingRequest(host="up.example", port=80, resource="/x", protocols=self.offered)


# -- _autobahn.install(): lazy pformat / hltype / hlval, Timings.__str__ -------------


def _calls_of(module, names: set[str]) -> list[tuple[str, int, str]]:
    """(name, line, where) of every call of a module-global ``names`` in ``module``'s source."""
    tree = ast.parse(inspect.getsource(module))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            up = parents[node]
            if isinstance(up, ast.keyword) and isinstance(parents[up], ast.Call):
                call = ast.unparse(parents[up].func)
                where = "log" if re.fullmatch(r"self\.log\.(trace|debug|info|warn|error|critical|failure)", call) \
                    else call
            else:
                scope = node
                while scope in parents and not isinstance(scope, (ast.FunctionDef, ast.ClassDef)):
                    scope = parents[scope]
                where = f"{type(up).__name__} in {getattr(scope, 'name', '?')}"
            found.append((node.func.id, node.lineno, where))
    return found


@pytest.mark.parametrize("module, names", [(protocol, {"pformat", "hltype", "hlval"}),
                                           (tx_websocket, {"hltype", "hlval"})],
                         ids=["autobahn.websocket.protocol", "autobahn.twisted.websocket"])
def test_formatting_helpers_are_module_globals_used_only_as_log_arguments(module, names: set[str]) -> None:
    # install() swaps these module globals for lazy ones: that works only
    # while Autobahn looks them up there and only hands them to a logger
    with relied_on(LIB, f"{module.__name__}.{'/'.join(sorted(names))} (module globals, log arguments only)",
                   "wsgateway/_compat/autobahn.py"):
        for name in names:
            assert name in vars(module), f"{name} is not a global of {module.__name__} any more"
        calls = _calls_of(module, names)
        assert calls, "none of them is called any more: the patch does nothing"
        for name, line, where in calls:
            if module is protocol and name == "pformat" and where == "Return in __str__":
                continue  # Timings.__str__, replaced by install() itself
            assert where == "log", f"{name}() at line {line} is used outside a log call ({where})"


def test_hltype_and_hlval_keep_their_signatures() -> None:
    from autobahn import util

    with relied_on(LIB, "autobahn.util.hltype / hlval", "wsgateway/_compat/autobahn.py"):
        assert isinstance(util.hltype(test_hltype_and_hlval_keep_their_signatures), str)
        assert isinstance(util.hlval(3, color="white", bold=True), str)


def test_timings_str_is_pformat_of_its_timings() -> None:
    with relied_on(LIB, "protocol.Timings (._timings, __str__ = pformat(self._timings))", "wsgateway/_compat/autobahn.py"):
        t = protocol.Timings()
        t.track("onOpen")
        assert isinstance(t._timings, dict) and "onOpen" in t._timings
        tree = ast.parse(inspect.getsource(protocol.Timings))
        body = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__str__")
        assert "pformat(self._timings)" in ast.unparse(body), "Autobahn's Timings.__str__ changed"
        assert str(t) == pprint.pformat(t._timings)  # with or without install()


def test_a_handshake_logged_at_debug_level_after_install() -> None:
    import txaio
    from twisted.logger import formatEvent, globalLogPublisher

    from wsgateway._compat import autobahn as _autobahn

    _autobahn.install()
    rendered: list[str] = []

    def observer(event) -> None:
        if event.get("log_namespace", "").startswith("autobahn"):
            rendered.append(formatEvent(event))

    level = txaio.get_global_log_level()
    globalLogPublisher.addObserver(observer)
    txaio.set_global_log_level("debug")
    try:
        with relied_on(LIB, "what Autobahn's debug log lines do with pformat/hltype/hlval", "wsgateway/_compat/autobahn.py"):
            p, t = server()
            p.trackTimings = True
            p.dataReceived(head() + masked_text(b"hi"))
            assert t.value().startswith(b"HTTP/1.1 101")
            assert rendered, "no debug line was logged"
            bad = [line for line in rendered if "Unable to format event" in line]
            assert not bad, bad[0]
    finally:
        txaio.set_global_log_level(level)
        globalLogPublisher.removeObserver(observer)


# -- _autobahn.preset_options(): CONFIG_ATTRS and _connectionMade ---------------------


@pytest.mark.parametrize("side", ["server", "client"])
def test_connection_made_copies_config_attrs_the_protocol_does_not_have(side: str) -> None:
    from wsgateway._compat import autobahn as _autobahn

    with relied_on(LIB, f"{side} protocol CONFIG_ATTRS / _connectionMade (copies an option unless the protocol "
                        "has it)", "wsgateway/_compat/autobahn.py"):
        if side == "server":
            factory = WebSocketServerFactory(reactor=Clock())
            base = WebSocketServerProtocol
        else:
            factory = WebSocketClientFactory("ws://up.example:80", reactor=Clock())
            base = Client
        names = base.CONFIG_ATTRS
        assert isinstance(names, (list, tuple)) and "openHandshakeTimeout" in names and "autoPingInterval" in names
        for name in names:
            assert hasattr(factory, name), f"the factory has no {name}"
        factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0)
        factory.protocol = type("Own", (base,), {"autoPingInterval": 7})
        p = factory.buildProtocol(None)
        p.makeConnection(Transport())
        assert p.autoPingInterval == 7, "an option the protocol class has was overwritten from the factory"
        assert p.openHandshakeTimeout == 0 and "openHandshakeTimeout" in vars(p)
        # and the way preset_options uses it
        factory.protocol = base
        factory.setProtocolOptions(openHandshakeTimeout=3)
        _autobahn.preset_options(factory)
        p = factory.buildProtocol(None)
        p.makeConnection(Transport())
        assert p.openHandshakeTimeout == 3 and "openHandshakeTimeout" not in vars(p)


# -- wsgateway/handshake/server.py / wsgateway/upstream/leg.py / wsgateway/durable/delivery.py: _dataReceived and the data buffer -------


@pytest.mark.parametrize("cls", [WebSocketServerProtocol, WebSocketClientProtocol])
def test_data_received_goes_through_underscore_data_received(cls) -> None:
    with relied_on(LIB, f"{cls.__name__}.dataReceived -> _dataReceived(data)",
                   "wsgateway/handshake/server.py, wsgateway/upstream/leg.py, wsgateway/durable/delivery.py"):
        assert list(inspect.signature(cls._dataReceived).parameters) == ["self", "data"]
        p = cls.__new__(cls)
        seen = []
        p._dataReceived = seen.append
        p.log = cls.log  # dataReceived logs at debug level first
        p.peer = "test"
        cls.dataReceived(p, b"abc")
        assert seen == [b"abc"]


def test_server_buffers_a_partial_head_in_data() -> None:
    with relied_on(LIB, "WebSocketServerProtocol.data (the unparsed head while STATE_CONNECTING)",
                   "wsgateway/handshake/server.py"):
        p, t = server()
        p._dataReceived(head()[:25])
        assert p.state == WebSocketProtocol.STATE_CONNECTING and p.data == head()[:25]
        p._dataReceived(head()[25:])
        assert p.state == WebSocketProtocol.STATE_OPEN and t.value().startswith(b"HTTP/1.1 101")


def test_server_request_head_and_target_at_on_connect() -> None:
    seen = {}

    class S(WebSocketServerProtocol):
        def onConnect(self, request):
            seen["data"], seen["uri"] = self.http_request_data, self.http_request_uri

    with relied_on(LIB, "WebSocketServerProtocol.http_request_data / http_request_uri (raw head, raw target)",
                   "wsgateway/handshake/server.py, wsgateway/handshake/headers.py"):
        p, _ = server(S)
        p._dataReceived(head("/a/b?token=x&y=%20") + masked_text(b"early"))
        assert seen["data"] == head("/a/b?token=x&y=%20"), "not the raw head up to and including CRLF CRLF"
        assert seen["uri"] == "/a/b?token=x&y=%20"


@pytest.mark.parametrize("keep", [False, True])
def test_server_frames_after_the_head_wait_in_data_until_after_on_open(keep: bool) -> None:
    got = []

    class S(WebSocketServerProtocol):
        def onOpen(self):
            got.append(("open", self.data))
            if not keep:
                self.data = b""  # wsgateway/handshake/server.py: the relay takes them
            else:
                self.data += masked_text(b"more")  # broadcast: Autobahn reads them right after onOpen

        def onMessage(self, payload, isBinary):
            got.append(("msg", payload))

    with relied_on(LIB, "WebSocketServerProtocol.data at onOpen (early frames, consumed after onOpen)",
                   "wsgateway/handshake/server.py"):
        p, _ = server(S)
        p._dataReceived(head() + masked_text(b"hi"))
        assert got[0] == ("open", masked_text(b"hi"))
        assert got[1:] == ([("msg", b"hi"), ("msg", b"more")] if keep else [])


def test_on_connect_may_answer_with_a_deferred_and_deny_through_fail_handshake() -> None:
    from twisted.internet.defer import Deferred

    calls = []

    class S(WebSocketServerProtocol):
        def onConnect(self, request):
            self.pending = Deferred()
            return self.pending

        def failHandshake(self, reason, code=400, responseHeaders=None):
            calls.append((reason, code))
            self.wasClean = True
            self.sendHttpErrorResponse(code, reason, [("Content-Length", "0")])
            self.dropConnection(abort=False)

    with relied_on(LIB, "WebSocketServerProtocol.failHandshake(reason, code, responseHeaders) / "
                        "sendHttpErrorResponse / dropConnection / wasClean", "wsgateway/handshake/server.py"):
        params = list(inspect.signature(WebSocketServerProtocol.failHandshake).parameters)
        assert params == ["self", "reason", "code", "responseHeaders"]
        p, t = server(S)
        p._dataReceived(head())
        assert t.value() == b""  # waits for the Deferred
        p.pending.errback(ConnectionDeny(403, "Forbidden"))
        assert calls == [("Forbidden", 403)]
        assert t.value().startswith(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n")
        assert hasattr(p, "wasClean")


def test_client_keeps_frames_after_the_101_in_data_at_on_open() -> None:
    got = {}

    class C(Client):
        offered = ["chat"]

        def onOpen(self):
            got["data"] = self.data
            got["protocol"] = self.websocket_protocol_in_use

    with relied_on(LIB, "WebSocketClientProtocol.data at onOpen / websocket_protocol_in_use",
                   "wsgateway/upstream/leg.py"):
        p, t = client(C, ["chat"])
        p._dataReceived(accept(t.value(), "Sec-WebSocket-Protocol: chat\r\n") + b"\x81\x02hi")
        assert got == {"data": b"\x81\x02hi", "protocol": "chat"}


def test_client_checks_the_chosen_subprotocol_against_its_factory_attribute() -> None:
    # upstreamleg._FactoryView: one shared factory, each connection's own offer
    from wsgateway.upstream.leg import _FactoryView

    with relied_on(LIB, "WebSocketClientProtocol reads factory.protocols through self.factory",
                   "wsgateway/upstream/leg.py"):
        for offered, accepted in ((["chat"], True), (["other"], False)):
            p, t = client(Client, ["chat"])
            p.factory = _FactoryView(p.factory, offered)
            p._dataReceived(accept(t.value(), "Sec-WebSocket-Protocol: chat\r\n"))
            assert (p.state == WebSocketProtocol.STATE_OPEN) is accepted, offered


def test_client_refusal_sets_the_status_line_before_fail_handshake() -> None:
    seen = []

    class C(Client):
        def failHandshake(self, reason):
            seen.append(getattr(self, "http_status_line", None))
            super().failHandshake(reason)

    with relied_on(LIB, "WebSocketClientProtocol.http_status_line / failHandshake(reason)",
                   "wsgateway/upstream/leg.py"):
        assert list(inspect.signature(WebSocketClientProtocol.failHandshake).parameters) == ["self", "reason"]
        p, t = client(C)
        p._dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        assert seen == ["HTTP/1.1 403 Forbidden"]


def test_close_state_names_we_read() -> None:
    with relied_on(LIB, "sendCloseFrame(code, reasonUtf8, isReply) / localCloseCode / remoteCloseCode / "
                        "closedByMe / state constants", "wsgateway/channels/outbox.py, wsgateway/handshake/server.py, "
                        "wsgateway/durable/delivery.py"):
        params = list(inspect.signature(WebSocketProtocol.sendCloseFrame).parameters)
        assert params[:4] == ["self", "code", "reasonUtf8", "isReply"]
        for name in ("STATE_CONNECTING", "STATE_OPEN"):
            assert isinstance(getattr(WebSocketProtocol, name), int)
        p, t = server()
        p._dataReceived(head())
        p.sendCloseFrame(1008, b"slow consumer", isReply=False)
        assert p.closedByMe is True and p.localCloseCode == 1008 and p.remoteCloseCode is None
        assert p.state == WebSocketProtocol.STATE_CLOSING


# -- our subclasses' own names must not be Autobahn's ----------------------------------

OVERRIDES = {
    # Autobahn's hooks and methods we override on purpose
    "connectionMade", "connectionLost", "dataReceived", "onConnect", "onConnecting", "onOpen", "onMessage",
    "onClose", "failHandshake", "buildProtocol", "protocol", "noisy", "log",
}


def _ours(cls) -> set[str]:
    return {n for n in vars(cls) if not (n.startswith("__") and n.endswith("__"))} - OVERRIDES


@pytest.mark.parametrize("which", ["GatewayServerProtocol", "GatewayServerFactory", "UpstreamProtocol"])
def test_our_attribute_names_do_not_shadow_autobahn_ones(which: str) -> None:
    from wsgateway.handshake import server as proxy
    from wsgateway.upstream import leg as upstreamleg

    cls = getattr(proxy, which, None) or getattr(upstreamleg, which)
    with relied_on(LIB, f"the names of {cls.__mro__[1].__name__} (one of ours now shadows one of Autobahn's)",
                   f"wsgateway/{cls.__module__.split('.')[-1]}.py"):
        base = cls.__mro__[1]
        if which == "UpstreamProtocol":
            p, t = client(Client)
            p._dataReceived(accept(t.value()))
            live = set(vars(p))
        elif which == "GatewayServerProtocol":
            p, _ = server()
            p._dataReceived(head())
            live = set(vars(p))
        else:
            live = set(vars(WebSocketServerFactory(reactor=Clock())))
        theirs = {n for k in base.__mro__ if k.__module__.startswith("autobahn") for n in vars(k)} | live
        clash = sorted(_ours(cls) & theirs)
        assert not clash, f"{cls.__name__} defines {clash}, which Autobahn now uses too"
        if which == "GatewayServerFactory":
            assert "_options_of" not in theirs  # _autobahn.preset_options keeps its base class there


# -- wsgateway/service.py / wsgateway/ops/logs.py -------------------------------------------------------------


def test_nvx_flag_and_log_namespace() -> None:
    from autobahn.websocket import USES_NVX

    with relied_on(LIB, "autobahn.websocket.USES_NVX / the 'autobahn' log namespace",
                   "wsgateway/service.py, wsgateway/ops/logs.py"):
        assert isinstance(USES_NVX, bool)
        for cls in (WebSocketServerProtocol, WebSocketClientProtocol):
            namespace = getattr(getattr(cls.log, "_logger", None), "namespace", "autobahn")
            assert namespace.startswith("autobahn"), namespace


def test_a_peers_protocol_error_is_logged_through_warn_with_the_texts_peer_fault_log_lowers() -> None:
    """wsgateway/_compat/autobahn.py PeerFaultLog: a client's bad frame makes Autobahn call
    ``log.warn`` with format strings starting with PEER_FAULTS, and nothing else at warn."""
    from wsgateway._compat.autobahn import PeerFaultLog

    class Recorder:
        def __init__(self) -> None:
            self.lines: list[tuple[str, str]] = []

        def warn(self, format: str, **kwargs: object) -> None:
            self.lines.append(("warn", format))

        def debug(self, format: str, **kwargs: object) -> None:
            self.lines.append(("debug", format))

        def __getattr__(self, name: str):
            return lambda *a, **k: None

    with relied_on(LIB, "the warn lines of WebSocketProtocol._fail_connection and dropConnection",
                   "wsgateway/_compat/autobahn.py (PeerFaultLog)"):
        raw = Recorder()
        p, _ = server()
        p.log = raw
        p.dataReceived(head())
        assert p.state == WebSocketProtocol.STATE_OPEN
        p.dataReceived(bytes([0xA1, 0x80]) + b"abcd")  # RSV2 set, no extension: 1002
        assert p.state != WebSocketProtocol.STATE_OPEN
        warned = [f for level, f in raw.lines if level == "warn"]
        assert warned, "Autobahn no longer warns about a peer's protocol error"
        assert all(f.startswith(PeerFaultLog.PEER_FAULTS) for f in warned), warned
        assert warned[0].startswith("failing WebSocket connection")
    lowered = Recorder()
    log = PeerFaultLog(lowered)
    for f in warned:
        log.warn(f, code=1002, reason="x")
    log.warn("something else")
    assert [level for level, _ in lowered.lines] == ["debug"] * len(warned) + ["warn"]


# -- permessage-deflate: the upstream leg's check of the answer, the broadcast side's accept ---------


def test_client_consults_an_instance_accept_with_the_parsed_answer() -> None:
    from autobahn.websocket.compress import PerMessageDeflateResponseAccept

    seen = []

    def check(response):
        seen.append((response.server_no_context_takeover, response.client_no_context_takeover,
                     response.server_max_window_bits, response.client_max_window_bits))
        return PerMessageDeflateResponseAccept(response) if len(seen) == 1 else None

    with relied_on(LIB, "client perMessageCompressionAccept(response) read per instance at the handshake; "
                        "PerMessageDeflateResponse fields (0 = absent); PerMessageDeflateResponseAccept(response)",
                   "wsgateway/upstream/leg.py, wsgateway/upstream/compression.py (from_autobahn)"):
        p, t = client(Client)
        p.perMessageCompressionAccept = check
        p._dataReceived(accept(t.value(), "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                                          "server_max_window_bits=10\r\n"))
        assert p.state == WebSocketProtocol.STATE_OPEN
        assert seen == [(True, False, 10, 0)]
        refused, t2 = client(Client)
        refused.perMessageCompressionAccept = check
        refused._dataReceived(accept(t2.value(), "Sec-WebSocket-Extensions: permessage-deflate\r\n"))
        assert refused.state != WebSocketProtocol.STATE_OPEN, "an answer the check refused still opened the leg"


def test_server_consults_an_accept_set_in_on_connect_and_lists_the_extension_in_use() -> None:
    from autobahn.websocket.compress import PerMessageDeflateOfferAccept

    class S(WebSocketServerProtocol):
        def onConnect(self, request):
            self.perMessageCompressionAccept = lambda offers: PerMessageDeflateOfferAccept(offers[0])

    with relied_on(LIB, "server perMessageCompressionAccept read after onConnect; websocket_extensions_in_use",
                   "wsgateway/channels/sessions.py, wsgateway/channels/deflate.py, wsgateway/ops/accesslog.py"):
        p, t = server(S)
        p._dataReceived(head(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"))
        assert p.state == WebSocketProtocol.STATE_OPEN
        assert b"Sec-WebSocket-Extensions: permessage-deflate" in t.value()
        assert len(p.websocket_extensions_in_use) == 1


def test_a_failed_tls_handshake_is_logged_through_error_with_the_text_peer_fault_log_lowers() -> None:
    """wsgateway/_compat/autobahn.py PeerFaultLog: when a client's TLS handshake fails (pyOpenSSL's
    SSL.Error, e.g. a browser that does not trust the certificate), Autobahn's connectionLost calls
    ``log.error`` with ``_maybe_tls_reason``'s text as the format, starting with TLS_FAULT."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure

    from wsgateway._compat.autobahn import PeerFaultLog

    class Recorder:
        def __init__(self) -> None:
            self.lines: list[tuple[str, str, dict[str, object]]] = []

        def error(self, format: str, **kwargs: object) -> None:
            self.lines.append(("error", format, kwargs))

        def info(self, format: str, **kwargs: object) -> None:
            self.lines.append(("info", format, kwargs))

        def __getattr__(self, name: str):
            return lambda *a, **k: None

    # the shape pyOpenSSL raises: a list of (library, function, reason) from OpenSSL's error queue
    alert = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca")])
    with relied_on(LIB, "connectionLost logs an SSL.Error through log.error(_maybe_tls_reason(...)), "
                        "'SSL error: REASON (in FUNCTION)'", "wsgateway/_compat/autobahn.py (PeerFaultLog)"):
        raw = Recorder()
        p, _ = server()
        p.log = raw
        p.connectionLost(Failure(alert))
        errors = [f for level, f, _ in raw.lines if level == "error"]
        assert errors, "Autobahn no longer logs a failed TLS handshake at error"
        assert errors == ["SSL error: tlsv1 alert unknown ca (in )"], errors
        assert errors[0].startswith(PeerFaultLog.TLS_FAULT)
    lowered = Recorder()
    log = PeerFaultLog(lowered)
    log.error(errors[0])
    log.error("something else {x}", x=1)
    assert [(level, kw) for level, _, kw in lowered.lines] == [
        ("info", {"reason": "tlsv1 alert unknown ca (in )"}), ("error", {"x": 1})]
