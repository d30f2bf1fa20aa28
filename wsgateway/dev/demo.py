# -*- test-case-name: tests.integration.test_daemon -*-
"""
The built-in demo backend that ``etc/development.ini`` routes to, so a new
user sees forwarding do something with no service of their own:

- ``/echo`` sends every message back as it came (text stays text);
- ``/chat/ROOM`` is a chat room: each text message goes to everyone in the
  room as ``{"from": ..., "text": ...}``, with join and leave notices.

It is an ordinary Autobahn server on its own port, reached through the
gateway like any other upstream.
"""

from __future__ import annotations

import json
import os
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest


class DemoProtocol(WebSocketServerProtocol):
    room: str | None = None
    name = ""

    @property
    def demo(self) -> DemoFactory:
        """The factory, as its own class: an attribute annotation ``factory: DemoFactory`` would not satisfy
        Twisted's ``Factory.protocol`` type (a protocol whose factory is a ``Factory`` of that protocol)."""
        factory = self.factory
        assert isinstance(factory, DemoFactory)
        return factory

    def onConnect(self, request: ConnectionRequest) -> str | None:
        path = request.path
        if path == "/echo":
            self.room = None
        elif path.startswith("/chat/") and len(path) > len("/chat/") and "/" not in path[6:]:
            self.room = path[6:]
        else:
            raise ConnectionDeny(404, "Not Found")
        self.name = request.headers.get("x-user-id") or f"guest-{os.urandom(2).hex()}"
        # agree to the first subprotocol offered, so clients can see it pass through
        return request.protocols[0] if request.protocols else None

    def onOpen(self) -> None:
        if self.room is not None:
            members = self.demo.rooms.setdefault(self.room, set())
            members.add(self)
            self.demo.say(self.room, {"event": "join", "who": self.name, "members": len(members)})

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.room is None:
            self.sendMessage(payload, isBinary)
        elif not isBinary:
            self.demo.say(self.room, {"from": self.name, "text": payload.decode("utf-8")})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.room is not None:
            members = self.demo.rooms.get(self.room, set())
            members.discard(self)
            if members:
                self.demo.say(self.room, {"event": "leave", "who": self.name, "members": len(members)})
            else:
                self.demo.rooms.pop(self.room, None)


class DemoFactory(WebSocketServerFactory):
    protocol = DemoProtocol
    noisy = False

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor=reactor, server=None)
        self.setProtocolOptions(webStatus=False, maxMessagePayloadSize=1024 * 1024, autoPingInterval=0)
        self.rooms: dict[str, set[DemoProtocol]] = {}

    def say(self, room: str, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode("utf-8")
        for member in list(self.rooms.get(room, ())):
            member.sendMessage(data, False)
