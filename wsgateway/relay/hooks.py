# -*- test-case-name: tests.unit.relay.test_relay -*-
"""
The relay's collaborator when nothing is to happen on an upstream loss but
the client's 1014 (L{wsgateway.interfaces.RelayHooks}): every hook does
nothing, so a plain relay pays one no-op call per leg or close event and
nothing per message.
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer

from wsgateway.interfaces import RelayControl, RelayTransport
from wsgateway.relay.transport import Reader


class NoHooks:
    """RelayHooks that change nothing. Stateless: one instance serves every relay."""

    mirrors_held = True  # client frames go to a mirror whether or not they are held

    def attach(self, relay: RelayControl) -> None:
        pass

    def upstream_transport(self, transport: RelayTransport) -> RelayTransport:
        return transport

    def client_reader(self, client: RelayTransport) -> IPushProducer:
        return Reader(client)

    def started(self) -> None:
        pass

    def hold(self, out: bytes) -> None:
        pass  # never called: nothing sets relay.holding

    def upstream_control(self, opcode: int, payload: bytes) -> bool | None:
        return None

    def upstream_connection_lost(self, vanished: bool) -> bool:
        return False

    def awaits_upstream_close(self) -> bool:
        return False

    def closing_upstream(self) -> bool:
        return False

    def stop_reconnecting(self) -> None:
        pass

    def leg_headers(self) -> dict[str, str] | None:
        return None

    def upstream_reconnected(self) -> None:
        pass

    def maybe_done(self) -> None:
        pass


NO_HOOKS = NoHooks()
