"""
Graceful shutdown (docs/operations.md#signals-and-lifecycle): SIGTERM stops accepting, /readyz says
draining, and after drain_grace every client gets 1001 "going away" at its
own random moment of the drain window (no reconnect stampede), without
losing a message it sent before it saw the close; then twistd exits 0.

The relay's part, on a fake clock; the end-to-end run with a real twistd is
tests/integration/test_drain.py.
"""

from __future__ import annotations

import random


from support.relay_harness import c_frame, make, parse_frames, u_frame
from wsgateway.relay.codec import OP_CLOSE, OP_TEXT, encode_close
from wsgateway.service import drain_schedule

# -- the relay: drain() closes the client first -------------------------------


def test_drain_closes_the_client_first_and_forwards_what_it_sent_meanwhile() -> None:
    h = make(close_timeout=5.0)
    h.relay.drain()
    [close] = parse_frames(h.client.value())
    assert close.opcode == OP_CLOSE and not close.masked
    assert close.close == (1001, "server shutting down")
    assert h.upstream.value() == b""  # the upstream hears nothing yet
    assert (h.relay.closed_by, h.relay.close_code) == ("gateway", 1001)

    # sent by the client before our close reached it: still forwarded
    late = c_frame(OP_TEXT, b"in flight")
    answer = encode_close(1001, "", mask=True)
    h.relay.client_data(late + answer)
    assert h.upstream.value() == late + answer  # the message first, then the client's close
    # nothing from the upstream goes to the client after our close
    h.client.clear()
    h.relay.upstream_data(u_frame(OP_TEXT, b"too late") + encode_close(1001, "", mask=False))
    assert h.client.value() == b""
    h.clock.advance(0)
    assert h.client.kinds()[-1] == "lose"  # handshake complete: the server side closes TCP
    h.relay.client_connection_lost()
    assert h.upstream.kinds()[-1] == "lose"
    h.relay.upstream_connection_lost()
    h.assert_finished()
    assert h.client.abort_calls == 0 and h.upstream.abort_calls == 0


def test_drain_of_a_client_that_never_answers_still_closes_the_upstream() -> None:
    h = make(close_timeout=3.0)
    h.relay.drain()
    h.clock.advance(3.0)
    assert h.client.abort_calls == 1
    [close] = parse_frames(h.upstream.value())
    assert close.masked and close.close[0] == 1001
    assert h.upstream.kinds() == ["write", "lose"]  # a close, not a dropped connection
    h.lose_both()
    h.assert_finished()


def test_drain_of_a_connection_already_closing_changes_nothing() -> None:
    h = make()
    h.relay.client_data(encode_close(4000, "bye", mask=True))
    upstream_before, client_before = h.upstream.value(), h.client.value()
    h.relay.drain()
    assert (h.upstream.value(), h.client.value()) == (upstream_before, client_before)
    assert (h.relay.closed_by, h.relay.close_code) == ("client", 4000)


# -- the schedule: spread over the window, not all at once --------------------


def test_drain_schedule_spreads_closes_uniformly_over_half_the_shutdown_timeout() -> None:
    rng = random.Random(7)
    delays = drain_schedule(1000, shutdown_timeout=10.0, rng=rng)
    assert len(delays) == 1000
    assert all(0 <= d <= 5.0 for d in delays)
    # uniform: every second of the window gets its share
    for second in range(5):
        share = sum(1 for d in delays if second <= d < second + 1)
        assert 150 <= share <= 250, (second, share)
    assert drain_schedule(3, shutdown_timeout=0.0, rng=rng) == [0.0, 0.0, 0.0]


# -- the daemon ------------------------------------------------------------------
