# -*- test-case-name: tests.unit.channels.test_history -*-
"""
Channel history (docs/protocol.md#channel-history-and-recovery): which
channels keep one (L{HistoryRules}, from the broadcast routes'
C{history_size} and C{history_ttl}), the position of a message
(L{Position}: an offset, increasing by 1 per message per channel, and the
channel's epoch), the decision a recovery takes (L{recover}) and the
in-process store (L{MemoryHistory}). The Redis store is
L{wsgateway.channels.redishistory}.

Pure: nothing here imports Twisted; time is a number handed in.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from wsgateway.routing.templates import template_fields

__all__ = [
    "META_TTL", "HistoryRule", "HistoryRules", "Kept", "MemoryHistory", "Position", "Recovery", "Window", "new_epoch",
    "recover",
]

# How long a channel's offset and epoch outlive its last message. Without
# them a client that saw everything would be told "recovered: false" after a
# quiet spell longer than history_ttl; with them forever, every channel ever
# named would be remembered. A day covers a laptop closed overnight.
META_TTL = 86400.0


def new_epoch() -> str:
    """A channel's epoch: random, so a history lost and started again never reuses one."""
    return os.urandom(6).hex()


@dataclass(frozen=True)
class HistoryRule:
    size: int  # messages kept per channel
    ttl: float  # seconds a kept message stays recoverable


class HistoryRules:
    """
    Channel name -> its L{HistoryRule}: the first broadcast route, in file
    order, with C{history_size > 0} whose C{channel} template can produce
    the name (each C{{field}} matches one or more characters). Every node
    with the same config agrees, and so does C{POST /admin/publish}, which
    names a channel, not a route.
    """

    def __init__(self, rules: Iterable[tuple[str, HistoryRule]] = ()) -> None:
        self._rules = [(_template_regex(t), rule) for t, rule in rules]
        self._cache: dict[str, HistoryRule | None] = {}

    @classmethod
    def of(cls, routes: Iterable[Any]) -> HistoryRules:
        """From RouteConfigs: the broadcast ones with history on."""
        return cls(
            (r.channel, HistoryRule(r.history_size, r.history_ttl))
            for r in routes
            if r.mode == "broadcast" and r.channel and r.history_size > 0
        )

    def __bool__(self) -> bool:
        return bool(self._rules)

    def rule(self, channel: str) -> HistoryRule | None:
        if not self._rules:
            return None
        try:
            return self._cache[channel]
        except KeyError:
            pass
        found = next((rule for regex, rule in self._rules if regex.fullmatch(channel)), None)
        if len(self._cache) >= 4096:  # channel names come from clients: a bounded cache
            self._cache.clear()
        self._cache[channel] = found
        return found


def _template_regex(template: str) -> re.Pattern[str]:
    texts = re.split(r"\{[^{}]*\}", template)
    assert len(texts) == len(template_fields(template)) + 1
    return re.compile(".+".join(re.escape(t) for t in texts), re.DOTALL)


@dataclass(frozen=True)
class Position:
    """Where a published message sits in its channel's history."""

    offset: int
    epoch: str


@dataclass(frozen=True)
class Kept:
    """One message of a channel's history."""

    offset: int
    payload: bytes
    binary: bool


@dataclass(frozen=True)
class Window:
    """What a store holds of a channel after some offset, as one consistent read."""

    epoch: str
    top: int  # the newest offset (0: nothing published in this epoch)
    first: int  # the oldest offset still kept and unexpired (top + 1 when none is)
    messages: list[Kept] = field(default_factory=list)  # those after the offset asked for, in order


@dataclass(frozen=True)
class Recovery:
    """What a reconnecting client is told (the ``recovered`` frame), and what it gets before going live."""

    recovered: bool
    channel: str
    offset: int
    epoch: str
    messages: list[Kept]

    def frame(self) -> dict[str, Any]:
        return {"recovered": self.recovered, "channel": self.channel, "offset": self.offset, "epoch": self.epoch}


def recover(channel: str, since: int, epoch: str | None, window: Window | None) -> Recovery:
    """
    The answer to C{?since=OFFSET&epoch=EPOCH}. Recovered only when the
    epoch is the channel's and every message after OFFSET is still kept;
    otherwise C{recovered: false} and nothing from history (the client
    reloads its state, then takes live messages). C{window} None: the
    channel keeps no history.
    """
    if window is None:
        return Recovery(False, channel, 0, "", [])
    ok = epoch == window.epoch and since <= window.top and since + 1 >= window.first
    return Recovery(ok, channel, window.top, window.epoch, window.messages if ok else [])


class _Channel:
    __slots__ = ("epoch", "top", "kept", "last")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.top = 0
        self.kept: deque[tuple[int, float, bytes, bool]] = deque()
        self.last = 0.0


class MemoryHistory:
    """
    The history of the in-process broker: per channel, at most
    C{rule.size} messages younger than C{rule.ttl}, and at most
    C{max_bytes} of payload in all (the oldest message anywhere goes
    first), so clients publishing on many channels cannot grow the
    gateway's memory without bound. A channel idle for L{META_TTL} is
    forgotten: its next message starts a new epoch.
    """

    def __init__(self, *, max_bytes: int = 64 * 1024 * 1024, meta_ttl: float = META_TTL,
                 max_channels: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self.meta_ttl = meta_ttl
        self.max_channels = max_channels
        self.bytes = 0
        self.count = 0  # messages kept, in all
        self._channels: OrderedDict[str, _Channel] = OrderedDict()  # least recently published first
        # every kept message, oldest first: (its channel, offset, size). The
        # channel object, not its name: a forgotten channel's name may come
        # back as a new channel whose offsets start again at 1
        self._all: deque[tuple[_Channel, int, int]] = deque()

    def append(self, channel: str, rule: HistoryRule, payload: bytes, binary: bool, now: float) -> Position:
        self._forget_idle(now)
        ch = self._channel(channel)
        ch.top += 1
        ch.last = now
        self._channels.move_to_end(channel)
        ch.kept.append((ch.top, now, payload, binary))
        self.count += 1
        cutoff = now - rule.ttl
        while len(ch.kept) > rule.size or ch.kept[0][1] < cutoff:
            self._drop(ch)
        self._all.append((ch, ch.top, len(payload)))
        self.bytes += len(payload)
        while self.bytes > self.max_bytes and self._all:
            oldest, offset, _ = self._all[0]
            if oldest.kept and oldest.kept[0][0] == offset:
                self._drop(oldest)
            else:  # already trimmed from its channel (size) or its channel forgotten
                self._settle()
        if len(self._all) > 2 * self.count + 1024:
            # trimmed entries wait behind an older one still kept: compact
            # now and then, so what this holds stays proportional to what it keeps
            self._all = deque(e for e in self._all if e[0].kept and e[0].kept[0][0] <= e[1])
        return Position(ch.top, ch.epoch)

    def read(self, channel: str, rule: HistoryRule, since: int, now: float) -> Window:
        ch = self._channel(channel)
        cutoff = now - rule.ttl
        messages = [Kept(o, p, b) for o, t, p, b in ch.kept if t >= cutoff and o > since]
        alive = [o for o, t, _, _ in ch.kept if t >= cutoff]
        return Window(ch.epoch, ch.top, alive[0] if alive else ch.top + 1, messages)

    def _channel(self, channel: str) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None:
            if len(self._channels) >= self.max_channels:
                self._forget(next(iter(self._channels)))
            ch = self._channels[channel] = _Channel(new_epoch())
        return ch

    def _drop(self, ch: _Channel) -> None:
        """A channel's oldest message; its entry in C{_all} is settled when it reaches the front."""
        _, _, payload, _ = ch.kept.popleft()
        self.bytes -= len(payload)
        self.count -= 1
        self._settle()

    def _settle(self) -> None:
        # entries of _all whose message is gone from its channel are popped
        # from the front only, where the byte count no longer includes them
        while self._all:
            ch, offset, _ = self._all[0]
            if ch.kept and ch.kept[0][0] <= offset:
                return
            self._all.popleft()

    def _forget_idle(self, now: float) -> None:
        while self._channels:
            name, ch = next(iter(self._channels.items()))
            if now - ch.last < self.meta_ttl:
                return
            self._forget(name)

    def _forget(self, name: str) -> None:
        ch = self._channels.pop(name)
        for _, _, payload, _ in ch.kept:
            self.bytes -= len(payload)
        self.count -= len(ch.kept)
        ch.kept.clear()
        self._settle()
