"""
Pure units of L{wsgateway.handshake.admission}: client address behind trusted proxies,
connection counts (docs/protocol.md#handshake-statuses: 429 and 503) and the message token
bucket (docs/configuration.md ``[limits] messages_per_second``). No reactor, no clock:
time is a plain number.
"""

from __future__ import annotations

import random
from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgateway import codes
from wsgateway.handshake.admission import ConnectionLimiter, TokenBucket, client_ip

PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]

# -- client_ip ---------------------------------------------------------------


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    assert client_ip("203.0.113.7", "1.2.3.4", PROXIES) == "203.0.113.7"
    assert client_ip("203.0.113.7", None, PROXIES) == "203.0.113.7"


def test_no_trusted_proxies_configured_means_the_peer() -> None:
    assert client_ip("10.0.0.1", "1.2.3.4", []) == "10.0.0.1"


def test_trusted_peer_without_header_is_the_client() -> None:
    assert client_ip("10.0.0.1", None, PROXIES) == "10.0.0.1"
    assert client_ip("10.0.0.1", "", PROXIES) == "10.0.0.1"
    assert client_ip("10.0.0.1", " , ", PROXIES) == "10.0.0.1"


def test_rightmost_untrusted_hop_is_the_client() -> None:
    # the client forged "6.6.6.6"; the proxies appended the rest
    xff = "6.6.6.6, 198.51.100.9, 10.1.1.1, 10.2.2.2"
    assert client_ip("10.0.0.1", xff, PROXIES) == "198.51.100.9"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert client_ip("10.0.0.1", "10.9.9.9, 10.1.1.1", PROXIES) == "10.9.9.9"


@pytest.mark.parametrize(
    "garbage",
    ["unknown", "evil\r\nX-Admin: 1", "1.2.3.4.5", "", "_hidden", "1.2.3.4:notaport", "[::1", "fe80::1%eth0",
     "999.1.1.1", "1.2.3.4 5.6.7.8", "1.2.3.4:²"],
)
def test_garbage_stops_the_walk_at_the_last_good_hop(garbage: str) -> None:
    # a garbage entry right of the client: the last good (trusted) hop is used,
    # never the garbage nor anything left of it
    xff = f"6.6.6.6, {garbage}, 10.3.3.3"
    got = client_ip("10.0.0.1", xff, PROXIES)
    if garbage.strip():
        assert got == "10.3.3.3"
    else:
        assert got == "6.6.6.6"  # empty entries are skipped, as nginx does


def test_garbage_as_the_only_entry_gives_the_peer() -> None:
    assert client_ip("10.0.0.1", "not-an-ip", PROXIES) == "10.0.0.1"


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("198.51.100.9:5555", "198.51.100.9"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::ffff:198.51.100.9", "198.51.100.9"),
        ("[::ffff:198.51.100.9]:80", "198.51.100.9"),
        ("  198.51.100.9  ", "198.51.100.9"),
    ],
)
def test_entries_are_normalised(entry: str, expected: str) -> None:
    assert client_ip("10.0.0.1", entry, PROXIES) == expected


def test_peer_is_normalised_and_mapped_ipv4_matches_ipv4_trust() -> None:
    assert client_ip("::ffff:203.0.113.7", None, PROXIES) == "203.0.113.7"
    # a dual-stack listener reports a v4 proxy as mapped v6: still trusted
    assert client_ip("::ffff:10.0.0.1", "198.51.100.9", PROXIES) == "198.51.100.9"
    assert client_ip("fd00::5", "2001:db8::7, fd00::6", PROXIES) == "2001:db8::7"


def test_mapped_hop_in_the_header_counts_as_trusted() -> None:
    assert client_ip("10.0.0.1", "198.51.100.9, ::ffff:10.7.7.7", PROXIES) == "198.51.100.9"


def test_non_ip_peer_is_returned_as_is() -> None:
    # a UNIX socket peer: nothing to check against the trust list
    assert client_ip("", "1.2.3.4", PROXIES) == ""


xff_entries = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.0.0.9", "10.255.1.1", "fd00::1", "::ffff:10.1.2.3"]),
    st.text(max_size=20),
)


def _candidates(entries: list[str]) -> set[str]:
    """Every address an entry could be read as (a generous oracle)."""
    from ipaddress import IPv6Address, ip_address

    out = set()
    for e in entries:
        e = e.strip()
        for v in (e, e.rsplit(":", 1)[0], e.strip("[]"), e.rsplit(":", 1)[0].strip("[]")):
            try:
                a = ip_address(v)
            except ValueError:
                continue
            if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
                a = a.ipv4_mapped
            out.add(str(a))
    return out


@given(st.lists(xff_entries, max_size=8), st.sampled_from(["10.0.0.1", "203.0.113.7"]))
def test_the_answer_is_always_an_address_from_the_chain(entries: list[str], peer: str) -> None:
    from ipaddress import ip_address

    got = client_ip(peer, ",".join(entries), PROXIES)
    assert str(ip_address(got)) == got  # never a client-chosen string
    assert got == peer or got in _candidates(entries)
    if peer == "203.0.113.7":
        assert got == peer


# -- ConnectionLimiter ---------------------------------------------------------


def test_per_ip_limit_is_429_and_others_still_get_in() -> None:
    lim = ConnectionLimiter(max_connections=0, max_per_ip=2)
    assert lim.admit("1.1.1.1") is None
    assert lim.admit("1.1.1.1") is None
    assert lim.admit("1.1.1.1") == codes.TOO_MANY_REQUESTS == 429
    assert lim.admit("2.2.2.2") is None
    assert lim.per_ip("1.1.1.1") == 2 and lim.active == 3


def test_total_limit_is_503_and_wins_over_per_ip() -> None:
    lim = ConnectionLimiter(max_connections=2, max_per_ip=1)
    assert lim.admit("1.1.1.1") is None
    assert lim.admit("2.2.2.2") is None
    assert lim.admit("3.3.3.3") == codes.UNAVAILABLE == 503
    # full gateway: 503 even for an address over its own share
    assert lim.admit("1.1.1.1") == 503
    assert lim.active == 2


def test_refusals_count_nothing_and_release_frees_a_slot() -> None:
    lim = ConnectionLimiter(max_connections=1, max_per_ip=0)
    assert lim.admit("1.1.1.1") is None
    for _ in range(5):
        assert lim.admit("2.2.2.2") == 503
    assert lim.per_ip("2.2.2.2") == 0 and len(lim) == 1
    assert lim.release("1.1.1.1") is True
    assert lim.admit("2.2.2.2") is None


def test_zero_means_unlimited() -> None:
    lim = ConnectionLimiter(0, 0)
    for _ in range(10_000):
        assert lim.admit("1.1.1.1") is None
    assert lim.active == 10_000


def test_no_entry_left_once_released() -> None:
    lim = ConnectionLimiter(0, 0)
    ips = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]
    for ip in ips:
        lim.admit(ip)
        lim.admit(ip)
    for ip in ips:
        lim.release(ip)
        lim.release(ip)
    assert lim.active == 0 and len(lim) == 0 and lim._counts == {}


def test_unmatched_release_changes_nothing() -> None:
    lim = ConnectionLimiter(0, 0)
    lim.admit("1.1.1.1")
    assert lim.release("2.2.2.2") is False
    assert lim.release("1.1.1.1") is True
    assert lim.release("1.1.1.1") is False
    assert lim.active == 0 and len(lim) == 0


def test_random_admit_release_keeps_exact_counts() -> None:
    rng = random.Random(7)
    lim = ConnectionLimiter(max_connections=50, max_per_ip=5)
    held: list[str] = []
    for _ in range(20_000):
        if held and rng.random() < 0.5:
            ip = held.pop(rng.randrange(len(held)))
            assert lim.release(ip)
        else:
            ip = f"192.0.2.{rng.randrange(20)}"
            status = lim.admit(ip)
            if status is None:
                held.append(ip)
            elif status == 503:
                assert len(held) == 50
            else:
                assert status == 429 and held.count(ip) == 5
        assert lim.active == len(held)
    for ip in set(held):
        assert lim.per_ip(ip) == held.count(ip)
    assert len(lim) == len(set(held))


def test_configure_swaps_limits_and_keeps_counts() -> None:
    lim = ConnectionLimiter(max_connections=10, max_per_ip=10)
    for _ in range(4):
        assert lim.admit("1.1.1.1") is None
    lim.configure(max_connections=3, max_per_ip=2)
    assert (lim.max_connections, lim.max_per_ip) == (3, 2)
    assert lim.active == 4 and lim.per_ip("1.1.1.1") == 4
    assert lim.admit("2.2.2.2") == 503  # over the new total already
    for _ in range(2):
        lim.release("1.1.1.1")
    assert lim.admit("1.1.1.1") == 429  # 2 left: at the new per-IP limit
    assert lim.admit("2.2.2.2") is None
    lim.configure(0, 0)
    assert lim.admit("1.1.1.1") is None


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        ConnectionLimiter(-1, 0)
    lim = ConnectionLimiter(1, 1)
    with pytest.raises(ValueError):
        lim.configure(0, -1)
    assert (lim.max_connections, lim.max_per_ip) == (1, 1)


# -- TokenBucket ---------------------------------------------------------------


def test_bucket_starts_full_then_refills_at_the_rate() -> None:
    b = TokenBucket(rate=10, burst=20, now=100.0)
    assert all(b.take(100.0) for _ in range(20))
    assert not b.take(100.0)
    assert not b.take(100.09)  # 0.9 of a token
    assert b.take(100.1)
    assert not b.take(100.1)


def test_bucket_never_saves_more_than_the_burst() -> None:
    b = TokenBucket(rate=10, burst=20, now=0.0)
    assert b.take(3600.0)
    assert b.tokens == pytest.approx(19)
    assert sum(b.take(3600.0) for _ in range(50)) == 19


def test_exactly_the_rate_is_sustained_despite_float_steps() -> None:
    b = TokenBucket(rate=3, burst=1, now=0.0)
    now = 0.0
    for _ in range(10_000):
        assert b.take(now)
        now += 1 / 3


def test_a_clock_stepping_back_adds_nothing() -> None:
    b = TokenBucket(rate=1, burst=1, now=50.0)
    assert b.take(50.0)
    assert not b.take(40.0)
    assert not b.take(50.5)
    assert b.take(51.0)


def test_bad_bucket_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5, now=0)


@given(
    st.floats(0.1, 1000),
    st.lists(st.floats(0, 5), max_size=200),
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_time(rate: float, gaps: list[float]) -> None:
    burst = max(2 * rate, 1.0)
    b = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        admitted += b.take(now)
        assert admitted <= burst + rate * now + 1e-6
