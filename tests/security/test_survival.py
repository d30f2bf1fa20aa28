"""
After the whole hostile suite (these tests are moved to the end of the
session by tests/security/conftest.py): the main gateway is the same process,
still serves a normal client, has let go of every socket, has its memory back
near where it started, and no log of any gateway in the suite holds a secret
a test sent.
"""

from __future__ import annotations

import time

import pytest
from websockets.sync.client import connect

from support.waiting import wait_for

from .helpers import ALLOWED_ORIGIN, Main, Secrets, fd_count, uid

pytestmark = pytest.mark.security_last

# The bound on RSS growth. Leaked sockets are caught exactly by the fd check
# below; this catches what a leak would hold in memory (buffered frames,
# relays kept alive by a reference cycle, per-IP entries of refused clients).
# What legitimately stays is CPython's allocator keeping freed arenas after
# 1 000 concurrent handshakes: about 2 MiB when this suite was written
# (61.9 MiB -> 64.1 MiB). 20 MiB is ten times that, so allocator noise never
# fails it, while holding on to the flood's 50 relays with data in their
# write buffers (up to 1 MiB each by default) would.
RSS_GROWTH_LIMIT_KIB = 20 * 1024


def test_main_gateway_still_serves_a_normal_client(main: Main) -> None:
    assert main.gw.proc.poll() is None, f"the gateway exited with {main.gw.proc.returncode}"
    path = "/open/" + uid("survivor")
    with connect(f"{main.gw.url}{path}", origin=ALLOWED_ORIGIN, compression=None, open_timeout=5) as ws:
        ws.send("still there?")
        assert ws.recv(timeout=5) == "still there?"
        ws.send(b"\x00\xff" * 1000)
        assert ws.recv(timeout=5) == b"\x00\xff" * 1000
    assert main.backend.get(path).received == ["still there?", b"\x00\xff" * 1000]


def test_main_gateway_let_go_of_every_socket(main: Main) -> None:
    """Every client and upstream socket of the suite is closed: the fd count is back at the baseline."""
    assert wait_for(lambda: fd_count(main.gw) <= main.baseline_fds, 10), (
        f"{fd_count(main.gw)} open fds, {main.baseline_fds} after warm-up"
    )


def test_main_gateway_memory_is_back_near_the_start(main: Main) -> None:
    time.sleep(1.0)  # settle: closes in flight, the relays' timers
    grown = main.gw.rss_kib() - main.baseline_rss_kib
    assert grown < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {grown / 1024:.1f} MiB over the suite"


def test_no_log_holds_a_secret_that_was_sent(sent: Secrets) -> None:
    assert sent.logs, "no gateway log was registered"
    assert len(sent.values) > 20, "the suite sent fewer secrets than it should have"
    for log in sent.logs:
        text = log.read_text(errors="replace")
        assert text, f"{log} is empty: nothing was logged at all"
        leaked = sorted(v for v in sent.values if v in text)
        assert leaked == [], f"{log.name} holds {len(leaked)} secret(s), e.g. {leaked[0][:12]}..."
