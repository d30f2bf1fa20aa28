"""
The ``listening on {address}`` line of each bound listener (wsgateway/listening.py):
what tests and operators read a ``tcp:0`` port from.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, eventAsJSON, formatEvent

from wsgateway.listening import ListeningService, describe


def _service(desc: str, kind: str = "gateway") -> tuple[ListeningService, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    svc = ListeningService(serverFromString(reactor, desc), Factory.forProtocol(Protocol), kind=kind, desc=desc)
    svc.log = Logger(namespace="wsgateway.listening.ListeningService", observer=events.append)
    return svc, events


def test_a_bound_port_0_is_logged_with_its_real_port() -> None:
    svc, events = _service("tcp:0:interface=127.0.0.1")
    svc.startService()
    try:
        port = svc.port.getHost().port
        assert port != 0
        [event] = events
        assert formatEvent(event) == f"gateway listening on 127.0.0.1:{port} (tcp:0:interface=127.0.0.1)"
        fields = json.loads(eventAsJSON(event))
        assert (fields["kind"], fields["endpoint"], fields["address"]) == (
            "gateway", "tcp:0:interface=127.0.0.1", f"127.0.0.1:{port}")
    finally:
        svc.stopService()
    assert svc.port is None


def test_a_port_that_cannot_be_bound_aborts_the_start_and_logs_nothing() -> None:
    first, _ = _service("tcp:0:interface=127.0.0.1")
    first.startService()
    try:
        taken = first.port.getHost().port
        second, events = _service(f"tcp:{taken}:interface=127.0.0.1", kind="admin")
        with pytest.raises(CannotListenError):
            second.startService()
        assert events == [] and second.port is None
    finally:
        first.stopService()


def test_addresses_read_as_operators_write_them() -> None:
    assert describe(IPv4Address("TCP", "127.0.0.1", 8080)) == "127.0.0.1:8080"
    assert describe(IPv6Address("TCP", "::1", 8080)) == "[::1]:8080"
    assert describe(UNIXAddress(b"/run/wsgateway/ws.sock")) == "/run/wsgateway/ws.sock"


def test_when_bound_fires_once_the_socket_is_bound_and_at_once_after() -> None:
    # what READY=1 for systemd waits for (wsgateway/sdnotify.py ready_when)
    svc, _ = _service("tcp:0:interface=127.0.0.1")
    before = svc.when_bound()
    assert not before.called
    svc.startService()
    try:
        fired: list[Any] = []
        before.addCallback(fired.append)
        svc.when_bound().addCallback(fired.append)
        assert fired == [svc.port, svc.port]
    finally:
        svc.stopService()
