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
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel, eventAsJSON, formatEvent

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


def test_a_port_that_cannot_be_bound_aborts_the_start_with_one_line_saying_what_to_do() -> None:
    # one line and exit status 1, not twistd's 40-line traceback (tests/integration/test_log_lines.py)
    first, _ = _service("tcp:0:interface=127.0.0.1")
    first.startService()
    try:
        taken = first.port.getHost().port
        desc = f"tcp:{taken}:interface=127.0.0.1"
        second, events = _service(desc, kind="admin")
        with pytest.raises(SystemExit) as exited:
            second.startService()
        assert exited.value.code == 1 and second.port is None
        [event] = events
        assert event["log_level"] == LogLevel.critical
        assert formatEvent(event) == (f"cannot listen on {desc}: address already in use; stop what holds the port "
                                      "or change [admin] listen")
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
