"""
txredisapi internals wsgateway relies on (see tests/unit/compat/helpers.py).

wsgateway.redis.link uses only txredisapi's protocol classes and connects by
itself (why: redislink's docstring); these tests drive those classes over a
StringTransport with a task.Clock and hand-written RESP replies.
"""

from __future__ import annotations

import inspect

import pytest
import txredisapi
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from .helpers import relied_on

LIB = "txredisapi"
OURS = "wsgateway/redis/link.py"


class StrictFactory:
    """
    Exactly what redislink._LinkFactory offers the protocol: any other
    attribute txredisapi asks its factory for fails the test.
    """

    __slots__ = ("calls",)
    isLazy = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def stopTrying(self) -> None:
        self.calls.append(("stopTrying", None))

    def connectionError(self, msg: str) -> None:
        self.calls.append(("connectionError", msg))


def connect(cls=txredisapi.RedisProtocol, **kwargs):
    kwargs = {"charset": None, "convertNumbers": False, **kwargs}
    p = cls(**kwargs)
    clock = Clock()
    p.callLater = clock.callLater  # what RedisLink._build does
    p.factory = StrictFactory()
    t = StringTransport()
    ready = []
    p.whenConnected().addCallback(ready.append)
    p.makeConnection(t)
    return p, t, clock, ready


def feed(p, clock: Clock, data: bytes) -> None:
    """Bytes from Redis; txredisapi parses what follows a bulk reply on a later turn (protocol.callLater)."""
    p.dataReceived(data)
    for _ in range(100):
        clock.advance(0)


def test_protocol_classes_take_the_arguments_redislink_passes() -> None:
    with relied_on(LIB, "RedisProtocol/SubscriberProtocol(charset, replyTimeout, password, dbid, convertNumbers, "
                        "username)", OURS):
        for cls in (txredisapi.RedisProtocol, txredisapi.SubscriberProtocol):
            params = inspect.signature(cls).parameters
            for name in ("charset", "replyTimeout", "password", "dbid", "convertNumbers", "username"):
                assert name in params, f"{cls.__name__} takes no {name}"
        assert issubclass(txredisapi.SubscriberProtocol, txredisapi.RedisProtocol)


def test_when_connected_fires_inside_make_connection_without_auth_or_select() -> None:
    with relied_on(LIB, "BaseRedisProtocol.whenConnected (fires in makeConnection when no AUTH/SELECT)", OURS):
        p, t, _, ready = connect()
        assert ready == [p] and t.value() == b""


def test_auth_and_select_on_connect_then_ready() -> None:
    with relied_on(LIB, "BaseRedisProtocol.connectionMade (AUTH, SELECT, then whenConnected)", OURS):
        p, t, _, ready = connect(password="pw", dbid=2, username="me")
        assert t.value() == b"*3\r\n$4\r\nAUTH\r\n$2\r\nme\r\n$2\r\npw\r\n" and ready == []
        t.clear()
        p.dataReceived(b"+OK\r\n")
        assert t.value() == b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n" and ready == []
        p.dataReceived(b"+OK\r\n")
        assert ready == [p] and p.factory.calls == []


def test_a_refused_auth_asks_exactly_what_our_factory_offers() -> None:
    with relied_on(LIB, "what BaseRedisProtocol.connectionMade asks of its factory (isLazy, stopTrying, "
                        "connectionError)", OURS + " (_LinkFactory)"):
        p, t, _, ready = connect(password="bad")
        p.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        names = [name for name, _ in p.factory.calls]
        assert names == ["stopTrying", "connectionError"] and ready == []
        assert "WRONGPASS" in p.factory.calls[1][1]
        assert t.disconnecting


def test_parsing_after_a_bulk_reply_resumes_through_the_protocol_call_later() -> None:
    # RedisLink gives each protocol its injected clock: replies parse on it too
    with relied_on(LIB, "LineReceiver.callLater (also resumes parsing after a bulk reply)", OURS):
        p, _, clock, _ = connect()
        results = []
        for key in ("a", "b"):
            p.execute_command("GET", key).addCallback(results.append)
        p.dataReceived(b"$1\r\nx\r\n$1\r\ny\r\n")
        assert results == [b"x"] and clock.getDelayedCalls()
        feed(p, clock, b"")
        assert results == [b"x", b"y"]


def test_reply_timeout_runs_on_the_protocol_call_later_and_aborts() -> None:
    with relied_on(LIB, "BaseRedisProtocol.callLater (replyTimeout's timer) / TimeoutError / abortConnection", OURS):
        p, t, clock, _ = connect(replyTimeout=2.0)
        failures: list[Failure] = []
        p.execute_command("PING").addErrback(failures.append)
        assert clock.getDelayedCalls(), "the reply timeout is not scheduled through protocol.callLater"
        clock.advance(2.0)
        assert failures and failures[0].check(txredisapi.TimeoutError)
        assert t.disconnecting  # StringTransport.abortConnection


def test_subscribe_has_no_reply_timeout() -> None:
    with relied_on(LIB, "SubscriberProtocol.subscribe (sent with apply_timeout=False)", OURS + ", wsgateway/channels/redisbroker.py"):
        p, t, clock, _ = connect(txredisapi.SubscriberProtocol, replyTimeout=2.0)
        p.subscribe([b"ch"])
        assert t.value() == b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n"
        assert not clock.getDelayedCalls()


def test_messages_reach_message_received_as_bytes() -> None:
    got = []

    class Sub(txredisapi.SubscriberProtocol):
        def messageReceived(self, pattern, channel, message):
            got.append((pattern, channel, message))

    with relied_on(LIB, "SubscriberProtocol.messageReceived(pattern, channel, message)", OURS):
        p, _, clock, _ = connect(Sub)
        p.subscribe([b"ch"])
        feed(p, clock, b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
        feed(p, clock, b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\n007\r\n")
        assert got == [(None, b"ch", b"007")]


def test_raw_replies_with_charset_none_and_convert_numbers_false() -> None:
    with relied_on(LIB, "charset=None / convertNumbers=False (bulk replies stay bytes)",
                   OURS + ", wsgateway/durable/redis_node.py, wsgateway/channels/presence.py"):
        p, _, _, _ = connect()
        results = []
        p.execute_command("GET", "k").addCallback(results.append)
        p.dataReceived(b"$3\r\n007\r\n")
        assert results == [b"007"]


def test_connection_lost_fails_waiting_commands_and_closed_ones_raise_at_once() -> None:
    from twisted.internet.error import ConnectionDone

    from wsgateway.redis.link import CommandProtocol

    lost = []

    class Link:
        def _lost(self, proto, why):
            lost.append(proto)

    with relied_on(LIB, "BaseRedisProtocol.connectionLost (fails waiting commands) / execute_command raising "
                        "ConnectionError when not connected", OURS + ", wsgateway/channels/redisbroker.py, wsgateway/durable/redis_node.py"):
        p, _, _, _ = connect(CommandProtocol)
        p.link = Link()
        failures: list[Failure] = []
        p.execute_command("PUBLISH", b"c", b"m").addErrback(failures.append)
        p.connectionLost(Failure(ConnectionDone()))
        assert failures and failures[0].check(txredisapi.ConnectionError) and lost == [p]
        with pytest.raises(txredisapi.ConnectionError):
            p.execute_command("PING")


def test_noscript_is_a_response_error_saying_so() -> None:
    with relied_on(LIB, "ResponseError for -NOSCRIPT (message starts with NOSCRIPT)", "wsgateway/durable/redis_node.py"):
        p, _, _, _ = connect()
        failures: list[Failure] = []
        p.execute_command("EVALSHA", "0" * 40, 0).addErrback(failures.append)
        p.dataReceived(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
        assert failures and failures[0].check(txredisapi.ResponseError)
        assert str(failures[0].value).startswith("NOSCRIPT")
