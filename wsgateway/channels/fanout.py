# -*- test-case-name: tests.integration.test_broker -*-
"""
What both brokers (L{wsgateway.channels.broker}) share: L{Fanout}, the
delivery of a channel's message to this node's subscribers, the
L{BrokerObserver} hooks and L{BrokerUnavailable}.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from wsgateway.channels.deflate import PreparedMessage

__all__ = ["BrokerObserver", "BrokerUnavailable", "Fanout", "NullObserver", "Subscriber"]


class Subscriber(Protocol):
    """
    Takes a channel's messages. One that also has
    C{deliver_prepared(message: PreparedMessage)} gets that instead: the
    message with the frames made of it, shared by every subscriber of this
    delivery (a broadcast connection's, outbox.PreparedSubscription).
    """

    def deliver(self, payload: bytes, binary: bool) -> None: ...


class BrokerObserver(Protocol):
    """Hooks for metrics; every method is called in the reactor thread."""

    def broker_published(self, channel: str, deliveries: int) -> None:
        """A local publish was accepted (and delivered to C{deliveries} local subscribers)."""

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        """A message from another node (or from outside the gateway) was fanned out here."""

    def broker_dropped(self, channel: str, reason: str) -> None:
        """A message lost: C{redis_down}, C{backlog} (refused), C{redis_error} (after sending), C{malformed}."""

    def broker_state(self, up: bool) -> None:
        """Redis went down (False) or came (back) up (True)."""

    def history_recovered(self, route: str, result: str) -> None:
        """A client asked to recover (C{?since=}): C{recovered}, or C{gap} (it was told C{recovered: false})."""

    def redis_state(self, shard: str, up: bool) -> None:
        """One shard's Redis (the only one, without C{shards}) went down or came (back) up."""

    def redis_failover(self, shard: str) -> None:
        """A shard's master moved (Sentinel), and its broker followed."""


class NullObserver:
    def broker_published(self, channel: str, deliveries: int) -> None:
        pass

    def broker_received(self, channel: str, deliveries: int, outside: bool) -> None:
        pass

    def broker_dropped(self, channel: str, reason: str) -> None:
        pass

    def broker_state(self, up: bool) -> None:
        pass

    def history_recovered(self, route: str, result: str) -> None:
        pass

    def redis_state(self, shard: str, up: bool) -> None:
        pass

    def redis_failover(self, shard: str) -> None:
        pass


class BrokerUnavailable(Exception):
    """
    A publish or presence read that did not happen. C{reason}: C{redis_down}
    (refused at once), C{backlog} (refused at once: too many publishes await
    Redis) or C{redis_error} (sent, then lost: timeout or connection lost).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason



class Fanout:
    """Channel -> this node's subscribers (by identity, in subscription order)."""

    log = Logger()

    def __init__(self) -> None:
        self._channels: dict[str, dict[int, Subscriber]] = {}

    def add(self, channel: str, subscriber: Subscriber) -> bool:
        """True when C{channel} had no subscriber before."""
        first = channel not in self._channels
        self._channels.setdefault(channel, {})[id(subscriber)] = subscriber
        return first

    def remove(self, channel: str, subscriber: Subscriber) -> bool:
        """True when that was C{channel}'s last subscriber."""
        subs = self._channels.get(channel)
        if subs is None or subs.get(id(subscriber)) is not subscriber:
            return False
        del subs[id(subscriber)]
        if subs:
            return False
        del self._channels[channel]
        return True

    def deliver(self, channel: str, payload: bytes, binary: bool, origin: object | None,
                position: object | None = None) -> int:
        """To every subscriber but C{origin}; how many took it. C{position}: its history.Position, if any."""
        subs = self._channels.get(channel)
        if not subs:
            return 0
        # one per message, whatever the number of subscribers: each frame
        # (plain, or compressed for one window) is made once, on first use
        message = PreparedMessage(payload, binary, channel, position)
        count = 0
        for key, sub in list(subs.items()):
            if sub is origin:
                continue
            current = self._channels.get(channel)
            if current is None or current.get(key) is not sub:
                continue  # unsubscribed by an earlier delivery of this message
            try:
                prepared = getattr(sub, "deliver_prepared", None)
                if prepared is not None:
                    prepared(message)
                else:
                    sub.deliver(payload, binary)
            except Exception:
                self.log.failure("a subscriber of {channel} failed to take a message", channel=channel)
            else:
                count += 1
        return count

    def counts(self) -> dict[str, int]:
        return {channel: len(subs) for channel, subs in self._channels.items()}

    def channels(self) -> list[str]:
        return list(self._channels)
