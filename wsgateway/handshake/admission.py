# -*- test-case-name: tests.security.test_limits, tests.unit.handshake.test_limits -*-
"""
Admission and rate policy (docs/configuration.md, ``[limits]``; docs/protocol.md#handshake-statuses, 429/503):
who the client is behind trusted proxies, how many connections it and the
whole gateway hold, and a per-connection message token bucket.

Pure: no reactor, no clock of its own. Callers pass ``now`` from their
injected clock, so tests drive time with plain numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from wsgateway import codes

__all__ = ["client_ip", "ConnectionLimiter", "PendingHandshakes", "TokenBucket"]

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


def _is_port(s: str) -> bool:
    # isdigit alone would take "²" or Arabic-Indic digits
    return 0 < len(s) <= 5 and s.isascii() and s.isdigit()


def _parse(entry: str) -> Address | None:
    """
    One address as proxies write it: ``1.2.3.4``, ``1.2.3.4:5678``,
    ``2001:db8::1``, ``[2001:db8::1]`` or ``[2001:db8::1]:443``; None for
    anything else. IPv4-mapped IPv6 becomes IPv4, so ``::ffff:10.0.0.1``
    matches a 10.0.0.0/8 trust rule and counts against the same per-IP limit.
    """
    s = entry.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            return None
        rest = s[end + 1 :]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return None
        s = s[1:end]
    elif s.count(":") == 1:
        # host:port; a bare IPv6 address has at least two colons
        s, _, port = s.partition(":")
        if not _is_port(port):
            return None
    # A zone id ("fe80::1%eth0") is text of the sender's choosing: an address
    # that carries one is refused rather than passed on with it.
    if "%" in s:
        return None
    try:
        addr = ip_address(s)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Address, trusted: tuple[Network, ...]) -> bool:
    # ``in`` across families is simply False, no exception
    return any(addr in net for net in trusted)


def client_ip(peer_ip: str, x_forwarded_for: str | None, trusted: Iterable[Network]) -> str:
    """
    The client's address for limits, logs and ``hash:ip``.

    The socket peer, unless the peer is a trusted proxy: then
    X-Forwarded-For is walked from the right (each proxy appends the address
    it saw), trusted hops skipped, and the first untrusted address is the
    client. Everything left of it was written by that client and proves
    nothing. When every hop is trusted, the leftmost one is the answer. An
    entry that is not an address stops the walk at the last good hop, so a
    client-chosen string never becomes "the IP": whatever is returned is a
    normalised address (or the socket peer as given, when it is not one,
    e.g. a UNIX socket).
    """
    peer = _parse(peer_ip)
    if peer is None:
        # not an IP peer (a UNIX socket): nothing to match trust rules against
        return peer_ip
    nets = tuple(trusted)
    if not x_forwarded_for or not nets or not _trusted(peer, nets):
        return str(peer)
    last = peer
    for entry in reversed(x_forwarded_for.split(",")):
        if not entry.strip():
            # "a,,b" or a trailing comma (joined headers): nginx skips these too
            continue
        addr = _parse(entry)
        if addr is None:
            break
        last = addr
        if not _trusted(addr, nets):
            break
    return str(last)


class ConnectionLimiter:
    """
    Open-connection counts for the whole gateway and per client address.

    ``admit`` and ``release`` must pair exactly (one release per admitted
    connection, from its connectionLost); an address's entry disappears when
    its count drops to 0, so a scan of many addresses leaves no memory behind.
    A limit of 0 means unlimited.

    Connections still in the handshake (TCP open, request head not yet
    read) count towards the per-address limit too (``begin_pending`` /
    ``end_pending``, which pair the same way): otherwise one address could
    hold any number of half-open sockets against a limit of 20.
    """

    __slots__ = ("_max", "_max_per_ip", "_counts", "_active", "_pending")

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self._counts: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._active = 0
        self._max = 0
        self._max_per_ip = 0
        self.configure(max_connections, max_per_ip)

    def configure(self, max_connections: int, max_per_ip: int) -> None:
        """
        New limits (config reload). Connections already open are kept and
        counted; when they exceed the new limits, new ones are refused until
        enough have closed.
        """
        if max_connections < 0 or max_per_ip < 0:
            raise ValueError("limits must be >= 0 (0 = unlimited)")
        self._max = max_connections
        self._max_per_ip = max_per_ip

    @property
    def max_connections(self) -> int:
        return self._max

    @property
    def max_per_ip(self) -> int:
        return self._max_per_ip

    @property
    def active(self) -> int:
        return self._active

    def per_ip(self, ip: str) -> int:
        return self._counts.get(ip, 0)

    def pending_per_ip(self, ip: str) -> int:
        return self._pending.get(ip, 0)

    def admit(self, ip: str) -> int | None:
        """
        Count a new connection from ``ip`` and return None, or count nothing
        and return the handshake status to refuse it with: 503 when the
        gateway is full (checked first: it is not this client's fault), 429
        when this address already holds its share.
        """
        if self._max and self._active >= self._max:
            return codes.UNAVAILABLE
        n = self._counts.get(ip, 0)
        if self._max_per_ip and n + self._pending.get(ip, 0) >= self._max_per_ip:
            return codes.TOO_MANY_REQUESTS
        self._counts[ip] = n + 1
        self._active += 1
        return None

    def begin_pending(self, ip: str) -> int | None:
        """
        Count a connection from ``ip`` whose request head has not arrived
        and return None, or count nothing and return 429 when the address's
        open and pending connections already reach its share. The gateway
        total is not checked here: pending connections have a bound of
        their own (L{PendingHandshakes}).
        """
        n = self._pending.get(ip, 0)
        if self._max_per_ip and self._counts.get(ip, 0) + n >= self._max_per_ip:
            return codes.TOO_MANY_REQUESTS
        self._pending[ip] = n + 1
        return None

    def end_pending(self, ip: str) -> bool:
        """Uncount one pending connection from ``ip``; False (nothing changed) when it holds none."""
        n = self._pending.get(ip, 0)
        if n <= 0:
            return False
        if n == 1:
            del self._pending[ip]
        else:
            self._pending[ip] = n - 1
        return True

    def release(self, ip: str) -> bool:
        """
        Uncount one connection from ``ip``. Returns False (and changes
        nothing) when ``ip`` holds none: a caller bug that must not push
        counts below zero nor raise inside a connectionLost.
        """
        n = self._counts.get(ip, 0)
        if n <= 0:
            return False
        if n == 1:
            del self._counts[ip]
        else:
            self._counts[ip] = n - 1
        self._active -= 1
        return True

    def __len__(self) -> int:
        """How many distinct addresses hold a connection."""
        return len(self._counts)


class PendingHandshakes:
    """
    The connections of the whole gateway that are not upgraded yet, oldest
    first. Past the bound the oldest are given back to be dropped, not the
    newest refused: a flood of half-open sockets then costs each of them its
    place within ``max_pending`` new connections, and a client that sends
    its request at once still gets through.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        # dicts keep insertion order: the first key is the oldest
        self._order: dict[Any, None] = {}

    def add(self, conn: Any, max_pending: int) -> list[Any]:
        """Hold ``conn``; return the oldest others, removed, that now exceed ``max_pending`` (>= 1)."""
        order = self._order
        dropped: list[Any] = []
        while order and len(order) >= max_pending:
            oldest = next(iter(order))
            del order[oldest]
            dropped.append(oldest)
        order[conn] = None
        return dropped

    def discard(self, conn: Any) -> bool:
        """Forget ``conn`` (upgraded, refused or lost); False when it was not held."""
        if conn not in self._order:
            return False
        del self._order[conn]
        return True

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, conn: Any) -> bool:
        return conn in self._order


class TokenBucket:
    """
    ``rate`` tokens a second, at most ``burst`` saved up; one per message.

    Starts full, so a client may send ``burst`` messages at once after
    connecting. It runs once per client message on the relay's hot path:
    a few float operations, no allocation, no call out.
    """

    __slots__ = ("_rate", "_burst", "_tokens", "_last")

    # Float sums of clock steps drift by an ulp or two; a client sending at
    # exactly the rate must not be refused for that.
    _EPSILON = 1e-9

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        if not burst >= 1:
            # below one token no message could ever pass
            raise ValueError("burst must be >= 1")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    @property
    def tokens(self) -> float:
        """Tokens left as of the last ``take`` (for tests and introspection)."""
        return self._tokens

    def take(self, now: float) -> bool:
        """Spend one token if there is one at time ``now``; False when empty."""
        elapsed = now - self._last
        tokens = self._tokens
        if elapsed > 0:
            # a clock that steps back adds nothing (and takes nothing away)
            self._last = now
            tokens += elapsed * self._rate
            if tokens > self._burst:
                tokens = self._burst
        if tokens >= 1.0 - self._EPSILON:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False
