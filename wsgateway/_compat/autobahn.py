# -*- test-case-name: tests.unit.handshake.test_proxy_units -*-
"""
Three adjustments to Autobahn: two measured, one for the log.

Its protocols build the arguments of
their debug log lines on every connection whether or not debug logging is
on (``pprint.pformat`` of the whole option table, ``hltype``/``hlval``
colouring). With both legs of a proxied connection paying it, that was over
40 % of the gateway's CPU per handshake (bench scenario e: 918 -> about
1 600 handshakes per core-second). The formatting is made lazy: a debug
line reads the same when debug logging is on and costs nothing when off.

And each new protocol copies its factory's 30-odd options onto itself,
reading each from the factory (through a Python ``__getattr__`` for an
upstream leg's per-connection factory view), unless the protocol already
has it: Autobahn's way to configure connections individually.
``preset_options`` uses that way, with a protocol subclass that holds the
factory's options: 5 % more handshakes per core-second (bench scenario e).

And Autobahn logs a peer's protocol error at warn level, one to three lines
per connection (``failing WebSocket connection (code=1002)``, ``dropping
connection to peer ... with abort=False``): on a broadcast route, where
Autobahn reads the client's frames, any unauthenticated peer could fill the
log at will. ``PeerFaultLog`` puts those two lines at debug, as the relay
does for proxy routes: the access line's close code already says it.
It also puts a client's failed TLS handshake (Autobahn's ``SSL error: ...``
at error) at info: a client that does not trust the certificate is no
error of the gateway's.
"""

from __future__ import annotations

from collections.abc import Callable
from pprint import pformat
from types import FunctionType
from typing import Any

from autobahn import util
from autobahn.twisted import websocket as tx_websocket
from autobahn.websocket import protocol


class Lazy:
    """Formats ``func(obj)`` only when the log line is rendered."""

    __slots__ = ("_func", "_obj")

    def __init__(self, func: Callable[..., str], obj: Any) -> None:
        self._func = func
        self._obj = obj

    def __str__(self) -> str:
        return self._func(self._obj)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


def _lazy(func: Callable[..., str]) -> Callable[[Any], Lazy]:
    def make(obj: Any, *args: Any, **kwargs: Any) -> Lazy:
        if args or kwargs:
            return Lazy(lambda o: func(o, *args, **kwargs), obj)
        return Lazy(func, obj)

    return make


def _timings_str(self: Any) -> str:
    # Timings.__str__ is the one caller that must get a real str back
    return pformat(self._timings)


def install() -> None:
    # setattr: each patch puts an object of another type (a Lazy maker, our
    # __str__) where Autobahn has its own, on purpose; mypy rightly refuses
    # that as an assignment.
    setattr(protocol, "pformat", _lazy(pformat))
    setattr(protocol.Timings, "__str__", _timings_str)
    for module in (protocol, tx_websocket):
        setattr(module, "hltype", _lazy(util.hltype))
        setattr(module, "hlval", _lazy(util.hlval))


def preset_options(factory: Any) -> None:
    """
    Make ``factory`` build protocols whose class holds its current options
    (call it again after each ``setProtocolOptions``). Options set on one
    protocol instance still win, as in Autobahn.
    """
    base = factory.__dict__.get("_options_of") or factory.protocol
    # a function held by a class would become a method: keep it a plain value
    options = {name: staticmethod(v) if isinstance(v, FunctionType) else v
               for name in base.CONFIG_ATTRS for v in (getattr(factory, name),)}
    factory._options_of = base
    factory.protocol = type(base.__name__, (base,), {**options, "__module__": base.__module__})


class PeerFaultLog:
    """
    A protocol's Autobahn logger, with the lines that report the peer's own
    protocol errors (``PEER_FAULTS``, the start of Autobahn's format
    strings) at debug instead of warn. Everything else is the logger's.
    """

    PEER_FAULTS = ("failing WebSocket connection", "dropping connection to peer")

    def __init__(self, log: Any) -> None:
        self._log = log

    def warn(self, format: str | None = None, **kwargs: Any) -> None:
        if format is not None and format.startswith(self.PEER_FAULTS):
            self._log.debug(format, **kwargs)
        else:
            self._log.warn(format, **kwargs)

    # Autobahn's connectionLost logs a TLS failure at error with
    # _maybe_tls_reason's text as the format: a client that does not trust
    # the certificate (a browser and a development certificate) or that
    # speaks plain HTTP to an ssl: port, the client's matter, not ours.
    TLS_FAULT = "SSL error: "

    def error(self, format: str | None = None, **kwargs: Any) -> None:
        if format is not None and format.startswith(self.TLS_FAULT):
            # as a field, not a format: the text is OpenSSL's, braces and all
            self._log.info("client TLS error: {reason}", reason=format[len(self.TLS_FAULT):])
        else:
            self._log.error(format, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)
