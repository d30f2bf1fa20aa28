# -*- test-case-name: tests.unit.config.test_config -*-
"""
The value parsers: one INI value's text -> a Python value, or L{Bad} naming each problem.

Pure functions and parser factories, shared by the section modules: durations, sizes,
whole numbers, booleans, one-of choices (from a C{Literal}), whitespace-separated lists,
origins, IP networks, C{Name=value} pairs; plus L{FrozenMap}, the read-only mapping the
frozen config holds. Values that depend on the file (paths relative to the INI's folder,
C{env:} and C{file:} indirection) are read by L{wsgateway.config.reader.Reader}.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, TypeVar, get_args

__all__ = [
    "BOOLEANS", "HOSTNAME", "INTEGER", "NAME", "TOKEN", "Bad", "FrozenMap", "Value", "boolean", "check_ip",
    "did_you_mean", "duration", "header_name", "integer", "is_token", "list_of", "network", "one_of", "optional",
    "origin", "pairs", "size", "text", "unique", "word",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping that keeps insertion order."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


NAME = re.compile(r"[A-Za-z0-9_.-]+")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header names
HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_SIZE = re.compile(r"(\d+)\s*([kmg]?)", re.IGNORECASE)
BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


class Bad(Exception):
    """A value is wrong; each argument is one problem."""


@dataclass(frozen=True)
class Value:
    text: str
    origin: str | None  # "env:NAME" / "file:PATH" when indirect; such text is never quoted

    def shown(self) -> str:
        return repr(self.text) if self.origin is None else f"(the value of {self.origin})"


def one_of(literal: Any) -> Callable[[Value], Any]:
    """A parser for the values of C{Literal["a", "b", ...]}, matched without case; returns one of them."""
    choices: tuple[str, ...] = get_args(literal)

    def parse(v: Value) -> Any:
        text = v.text.lower()
        if text in choices:
            return text
        raise Bad(f"{v.shown()} is not one of {' | '.join(choices)}{did_you_mean(text, choices)}")
    return parse


def did_you_mean(word: str, choices: Iterable[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def text(v: Value) -> str:
    if not v.text:
        raise Bad("must not be empty")
    return v.text


def optional(parse: Callable[[Value], T]) -> Callable[[Value], T | None]:
    return lambda v: parse(v) if v.text else None


def word(v: Value) -> str:
    if not v.text or any(c.isspace() for c in v.text):
        raise Bad("must be one word, without whitespace")
    return v.text


def header_name(v: Value) -> str:
    if not TOKEN.fullmatch(v.text):
        raise Bad(f"{v.shown()} is not a valid HTTP header name")
    return v.text


def is_token(text: str) -> bool:
    return TOKEN.fullmatch(text) is not None


def boolean(v: Value) -> bool:
    try:
        return BOOLEANS[v.text.lower()]
    except KeyError:
        raise Bad(f"{v.shown()} is not a boolean: use yes/no, true/false, on/off or 1/0") from None


def integer(minimum: int) -> Callable[[Value], int]:
    def parse(v: Value) -> int:
        if not INTEGER.fullmatch(v.text):
            raise Bad(f"{v.shown()} is not a whole number")
        number = int(v.text)
        if number < minimum:
            raise Bad("must not be negative" if minimum == 0 else f"must be at least {minimum}")
        return number
    return parse


def duration(positive: bool = False, what: str = "duration", example: str = "seconds, e.g. 2.5",
             ) -> Callable[[Value], float]:
    def parse(v: Value) -> float:
        if not _NUMBER.fullmatch(v.text):
            hint = " (seconds, without a unit)" if re.fullmatch(r"[\d.]+\s*[a-z]+", v.text, re.I) else ""
            raise Bad(f"invalid {what} {v.shown()}: expected {example}{hint if what == 'duration' else ''}")
        seconds = float(v.text)
        if seconds < 0:
            raise Bad("must not be negative")
        if positive and seconds == 0:
            raise Bad("must be greater than 0")
        return seconds
    return parse


def size(positive: bool = False) -> Callable[[Value], int]:
    def parse(v: Value) -> int:
        match = _SIZE.fullmatch(v.text)
        if match is None:
            hint = ""
            short = re.fullmatch(r"(\d+)\s*([kmg])i?b", v.text, re.I)
            if short:
                hint = f" (did you mean '{short.group(1)}{short.group(2).upper()}'?)"
            raise Bad(f"invalid size {v.shown()}: expected bytes with an optional K, M or G suffix "
                      f"(1M = 1048576){hint}")
        number: int = int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")
        if positive and number == 0:
            raise Bad("must be greater than 0")
        return number
    return parse


def list_of(item: Callable[[Value], T]) -> Callable[[Value], tuple[T, ...]]:
    """Whitespace-separated words (newlines included), each parsed by C{item}; every bad word is reported."""
    def parse(v: Value) -> tuple[T, ...]:
        out: list[T] = []
        problems: list[str] = []
        for one in v.text.split():
            try:
                out.append(item(Value(one, v.origin)))
            except Bad as e:
                problems.extend(e.args)
        if problems:
            raise Bad(*problems)
        return tuple(out)
    return parse


def unique(parse: Callable[[Value], tuple[tuple[str, str], ...]], what: str,
           index: int) -> Callable[[Value], tuple[tuple[str, str], ...]]:
    """C{parse}'s pairs, with element C{index} of each pair unique regardless of case."""
    def check(v: Value) -> tuple[tuple[str, str], ...]:
        found = parse(v)
        seen: set[str] = set()
        for pair in found:
            if pair[index].lower() in seen:
                raise Bad(f"{what} {pair[index]!r} appears twice")
            seen.add(pair[index].lower())
        return found
    return check


def pairs(what: str, check_name: Callable[[str], bool]) -> Callable[[Value], tuple[str, str]]:
    def parse(v: Value) -> tuple[str, str]:
        name, sep, value = v.text.partition("=")
        if not sep or not name or not value or not check_name(name):
            raise Bad(f"{v.shown()} is not {what}")
        return name, value
    return parse


def origin(v: Value) -> str:
    bad = Bad(f"invalid origin {v.shown()}: expected scheme://host[:port] or scheme://*.domain[:port]")
    match = re.fullmatch(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^:/\[\]]+)(?::(\d{1,5}))?", v.text.lower())
    if match is None:
        raise bad
    scheme, host, port = match.groups()
    if host.startswith("["):
        check_ip(host[1:-1], bad)
    elif not HOSTNAME.fullmatch(host.removeprefix("*.")) or host.endswith("."):
        raise bad
    if port is not None and not 0 < int(port) < 65536:
        raise bad
    if port is not None and (scheme, int(port)) in (("http", 80), ("https", 443)):
        port = None  # browsers never send the default port
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def check_ip(text: str, bad: Exception) -> None:
    """Raise C{bad} unless C{text} is an IP address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise bad from None


def network(v: Value) -> IPv4Network | IPv6Network:
    try:
        return ipaddress.ip_network(v.text, strict=False)
    except ValueError:
        raise Bad(f"{v.shown()} is not an IP network (CIDR such as 10.0.0.0/8, or an address)") from None
