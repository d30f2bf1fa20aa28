"""
A done relay is freed at once by reference counting (Relay.let_go): no
reference cycle keeps a connection's objects (its scanners, their zlib
state, its timers' owners) waiting for the cycle collector; and what may
still reach the relay after it is done finds it working.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from wsgateway.relay.codec import OP_PING, OP_TEXT, encode_close
from support.relay_harness import Harness, c_frame, make, u_frame


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    """Only reference counting frees anything while the test runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _closed_by_the_client(h: Harness) -> None:
    h.relay.client_data(c_frame(OP_TEXT, b"hello") + c_frame(OP_PING, b"p"))
    h.relay.upstream_data(u_frame(OP_TEXT, b"hello"))
    h.relay.client_data(encode_close(1000, "bye", mask=True))
    h.relay.upstream_data(encode_close(1000, "bye", mask=False))
    h.clock.advance(0)
    h.lose_both()


@pytest.mark.parametrize("deflate", [False, True])
def test_a_done_relay_is_freed_without_the_cycle_collector(no_cycle_collector: None, deflate: bool) -> None:
    h = make(ping_interval=30, ping_timeout=10, idle_timeout=600, deflate=deflate, log_fields={"conn_id": "c1"})
    _closed_by_the_client(h)
    h.assert_finished()
    relay = weakref.ref(h.relay)
    h.done.clear()
    del h
    assert relay() is None, f"kept alive by {[type(r).__name__ for r in gc.get_referrers(relay())]}"


def test_what_reaches_a_done_relay_finds_it_working() -> None:
    h = make(ping_interval=30, ping_timeout=10)
    legs = h.relay.client_leg, h.relay.upstream_leg
    _closed_by_the_client(h)
    written = h.client.value(), h.upstream.value()
    # a late close (a shutdown sweep, the admin API) and late reads of released legs change nothing
    h.relay.close(1001, "server shutting down")
    h.relay.drain()
    for leg in legs:
        leg.dataReceived(c_frame(OP_TEXT, b"late"))
        leg.connectionLost()
    assert (h.client.value(), h.upstream.value()) == written
    assert h.done == [h.relay]
    assert h.relay.close_code == 1000
    assert h.clock.getDelayedCalls() == []
