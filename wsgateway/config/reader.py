# -*- test-case-name: tests.unit.config.test_config -*-
"""
The reading machinery every section module shares.

L{Reader} is one INI file being read: its folder (relative paths are relative to it),
the environment (for C{env:} values), the problems found so far, each with its place in
the file so they can be reported in file order, and the listeners seen (for the clash
check). L{Section} is one section's raw values; a section module reads each key with
C{sec.get(key, parser, default)} and records a problem with C{sec.error(key, text)}.

This sits below the section modules and L{wsgateway.config.loader} above them, so the
package has no import cycle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsgateway.config.files import FileRefused, read_bounded
from wsgateway.config.values import Bad, Value

__all__ = ["NOT_A_KEY", "Listener", "Reader", "Section", "ini_keys"]

T = TypeVar("T")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The keys whose C{file:} value is a secret: the file must be private to the gateway's user (docs/configuration.md).
SECRET_KEYS = frozenset({("auth", "secret"), ("admin", "token"), ("redis", "url")})

# Field metadata for a section dataclass field that no key sets (the NAME of [route:NAME]).
NOT_A_KEY: Mapping[str, bool] = MappingProxyType({"ini_key": False})


def ini_keys(section_type: type) -> tuple[str, ...]:
    """The keys of a section: its dataclass's fields, in order, but those marked L{NOT_A_KEY}."""
    return tuple(f.name for f in fields(section_type) if f.metadata.get("ini_key", True))


class Section:
    """One section's raw values; problems are recorded against [name] key."""

    def __init__(self, reader: Reader, index: int, name: str, items: Mapping[str, str]) -> None:
        self.reader = reader
        self.index = index
        self.name = name
        self.items = dict(items)
        self.keys = list(items)
        self.failed: set[str] = set()
        self._values: dict[str, Value | None] = {}

    def error(self, key: str | None, problem: str) -> None:
        position = self.keys.index(key) if key in self.items else len(self.keys)
        where = f"[{self.name}] {key}" if key else f"[{self.name}]"
        self.reader.record((self.index, position), f"{where}: {problem}")
        if key:
            self.failed.add(key)

    def has(self, key: str) -> bool:
        return key in self.items

    def ok(self, *keys: str) -> bool:
        return not self.failed.intersection(keys)

    def value(self, key: str) -> Value | None:
        if key not in self._values:
            self._values[key] = self.reader.resolve(self, key, self.items[key])
        return self._values[key]

    def get(self, key: str, parse: Callable[[Value], T], default: T) -> T:
        if key not in self.items:
            return default
        v = self.value(key)
        if v is None:
            return default
        try:
            return parse(v)
        except Bad as e:
            for problem in e.args:
                self.error(key, problem)
            return default


@dataclass(frozen=True)
class Listener:
    section: Section | None  # None: a default, not written in the file
    where: str
    desc: str
    identity: tuple[Any, ...]


class Reader:
    def __init__(self, path: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.environ = environ
        self._errors: list[tuple[tuple[int, int], int, str]] = []
        self.listeners: list[Listener] = []

    def record(self, order: tuple[int, int], line: str) -> None:
        self._errors.append((order, len(self._errors), f"{self.path}: {line}"))

    def errors(self) -> list[str]:
        return [line for _, _, line in sorted(self._errors)]

    # -- values

    def resolve(self, sec: Section, key: str, raw: str) -> Value | None:
        text = raw.strip()
        if text.startswith("env:"):
            name = text[4:].strip()
            if not _ENV_NAME.fullmatch(name):
                sec.error(key, f"bad environment variable name after 'env:': {name!r}")
            elif name not in self.environ:
                sec.error(key, f"environment variable {name} is not set")
            else:
                return Value(self.environ[name].strip(), f"env:{name}")
            return None
        if text.startswith("file:"):
            given = text[5:].strip()
            try:
                data = read_bounded(self.abspath(given), private=(sec.name, key) in SECRET_KEYS)
                return Value(data.decode("utf-8").rstrip("\r\n"), f"file:{given}")
            except FileRefused as e:
                sec.error(key, str(e))
            except OSError as e:
                sec.error(key, f"cannot read {self._describe(given)}: {e.strerror or e}")
            except UnicodeDecodeError:
                sec.error(key, f"{self._describe(given)} is not UTF-8 text")
            return None
        return Value(text, None)

    def abspath(self, given: str) -> str:
        return os.path.normpath(os.path.join(self.base, given))

    def _describe(self, given: str) -> str:
        full = self.abspath(given)
        return repr(given) if given == full else f"{given!r} ({full})"

    def path_value(self, v: Value) -> str:
        if not v.text:
            raise Bad("must not be empty")
        return self.abspath(v.text)

    def readable(self, v: Value) -> str:
        """A regular file of at most 1 MiB that must exist at start; returns its absolute path."""
        self._read(v)
        return self.path_value(v)

    def private(self, v: Value) -> str:
        """L{readable}, and holding a secret: readable by the gateway's user only."""
        self._read(v, private=True)
        return self.path_value(v)

    def _read(self, v: Value, private: bool = False) -> bytes:
        full = self.path_value(v)
        try:
            return read_bounded(full, private=private)
        except FileRefused as e:
            raise Bad(str(e)) from None
        except OSError as e:
            raise Bad(f"cannot read {self._describe(v.text)}: {e.strerror or e}") from None

    def pem(self, kind: str) -> Callable[[Value], str]:
        """A parser for an existing PEM file holding C{kind}: certificates, certificate or key."""
        return lambda v: self._pem(v, kind)

    def _pem(self, v: Value, kind: str) -> str:
        full = self.path_value(v)
        data = self._read(v, private=kind == "key")
        try:
            if kind == "certificates":
                x509.load_pem_x509_certificates(data)
            elif kind == "certificate":
                x509.load_pem_x509_certificate(data)
            else:
                serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            what = "an unencrypted PEM private key" if kind == "key" else f"PEM {kind}"
            detail = "encrypted keys are not supported" if "encrypted" in str(e) else f"not {what}"
            raise Bad(f"{self._describe(v.text)}: {detail}") from None
        return full
