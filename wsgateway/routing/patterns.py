# -*- test-case-name: tests.unit.routing.test_routing -*-
"""
Path patterns: compiling a route's C{path} (L{compile_pattern}) and matching
a raw request path against it, plus the dot-segment check every handshake
runs. Pure Python and reactor-free.

Everything matches on the raw request target, never a percent-decoded one, so
C{/a%2Fb} is one segment and the upstream sees exactly what the client sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

__all__ = ["REST", "PathPattern", "PatternError", "RouteMatch", "compile_pattern", "has_dot_segments"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# Key under which PathPattern.match returns what a final /** matched.
REST = "**"


class PatternError(ValueError):
    """
    A path pattern, host or template is malformed. The message is one short
    sentence; the config loader prefixes the file, section and key.
    """


@dataclass(frozen=True)
class _Parsed:
    segments: tuple[str | None, ...]  # None = a capture
    captures: tuple[str, ...]
    literals: int
    prefix: str
    has_rest: bool


def _parse(source: str) -> _Parsed:
    if not source:
        raise PatternError("pattern is empty")
    if not source.startswith("/"):
        raise PatternError("pattern must start with '/'")
    if source == "/":
        # The one pattern with an empty segment: it matches the path "/",
        # whose only segment is empty.
        return _Parsed(("",), (), 0, "", False)
    raw = source[1:].split("/")
    has_rest = raw[-1] == "**"
    if has_rest:
        raw.pop()
    segments: list[str | None] = []
    captures: list[str] = []
    for number, seg in enumerate(raw, start=1):
        segments.append(_parse_segment(seg, number, len(raw) + has_rest, captures))
    if has_rest:
        # The text before /** (captures included) is what strip_prefix drops.
        prefix = source[: -len("/**")]
    else:
        prefix = ""
    return _Parsed(
        segments=tuple(segments),
        captures=tuple(captures),
        literals=sum(1 for s in segments if s is not None),
        prefix=prefix,
        has_rest=has_rest,
    )


def _parse_segment(seg: str, number: int, total: int, captures: list[str]) -> str | None:
    where = f"in segment {number}"
    if seg == "":
        if number == total:
            raise PatternError(f"empty segment {number} (trailing '/'); use '/**' for 'anything below'")
        raise PatternError(f"empty segment {number} ('//')")
    if "**" in seg:
        raise PatternError(f"'**' {where}: it is only allowed as the whole last segment ('/**')")
    if "*" in seg:
        raise PatternError(f"'*' wildcard {where}: only a final '/**' is supported")
    for char, why in (("?", "patterns match the path, not the query"), ("#", "fragments never reach the server")):
        if char in seg:
            raise PatternError(f"'{char}' {where}: {why}")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
        raise PatternError(f"whitespace or control character {where}")
    if seg in (".", ".."):
        raise PatternError(f"dot segment '{seg}' {where}: clients normalise these away")
    if "{" not in seg and "}" not in seg:
        return seg
    if seg.count("{") > 1 or seg.count("}") > 1:
        raise PatternError(f"nested or repeated braces {where}")
    opening = seg.find("{")
    closing = seg.find("}")
    if opening == -1:
        raise PatternError(f"'}}' without '{{' {where}")
    if closing == -1:
        raise PatternError(f"'{{' without '}}' {where}")
    if not (opening == 0 and closing == len(seg) - 1):
        raise PatternError(f"capture must be a whole segment: '{seg}' {where}")
    name = seg[1:-1]
    if not name:
        raise PatternError(f"empty capture name '{{}}' {where}")
    if not _IDENTIFIER.fullmatch(name):
        raise PatternError(f"capture name '{name}' {where} is not an identifier ([A-Za-z_][A-Za-z0-9_]*)")
    if name in captures:
        raise PatternError(f"capture '{{{name}}}' used twice")
    captures.append(name)
    return None


@dataclass(frozen=True)
class PathPattern:
    """
    A compiled path pattern; build it with L{compile_pattern}.

    @ivar prefix: the pattern text before a final C{/**} (C{"/chat"} for
        C{/chat/**}, C{"/u/{id}"} for C{/u/{id}/**}); C{""} without C{/**}.
    """

    source: str
    literals: int
    captures: tuple[str, ...]
    prefix: str
    has_rest: bool
    # Derived from source so a PathPattern built by hand still matches.
    _segments: tuple[str | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = _parse(self.source)
        given = (self.literals, self.captures, self.prefix, self.has_rest)
        if given != (parsed.literals, parsed.captures, parsed.prefix, parsed.has_rest):
            raise ValueError(f"PathPattern fields disagree with its source {self.source!r}; use compile_pattern()")
        object.__setattr__(self, "_segments", parsed.segments)

    @property
    def specificity(self) -> tuple[int, int]:
        """
        Larger is more specific: more literal segments, then fewer captures.

        A final C{/**} counts as one capture (it captures the remainder). If it
        counted as none, C{/**} would outrank C{/{tenant}} and C{/rooms/**}
        would make C{/rooms/{room}} unreachable whatever the file order.
        """
        return (self.literals, -(len(self.captures) + self.has_rest))

    def match(self, path: str) -> dict[str, str] | None:
        """
        Match a raw path without its query string.

        @return: the captures (name -> raw segment) plus, for a C{/**}
            pattern, C{"**"} -> the remainder (C{""}, C{"/"} or C{"/a/b"});
            L{None} when the path does not match.
        """
        if not path.startswith("/"):
            return None
        return self.match_segments(path[1:].split("/"))

    def match_segments(self, parts: list[str]) -> dict[str, str] | None:
        """L{match} for a path already split at C{/} (its leading C{/} removed)."""
        # Runs for every route on every handshake: no regex, no allocation
        # until we know it matches.
        segments = self._segments
        n = len(segments)
        count = len(parts)
        if count != n and not (self.has_rest and count > n):
            return None
        values = []
        for want, got in zip(segments, parts):
            if want is None:
                if not got:
                    return None
                values.append(got)
            elif want != got:
                return None
        result = dict(zip(self.captures, values))
        if self.has_rest:
            result[REST] = "/" + "/".join(parts[n:]) if count > n else ""
        return result


def compile_pattern(source: str) -> PathPattern:
    """Parse and validate a path pattern; raises L{PatternError}."""
    parsed = _parse(source)
    return PathPattern(source, parsed.literals, parsed.captures, parsed.prefix, parsed.has_rest)


def has_dot_segments(path: str) -> bool:
    """
    Whether a raw path (query allowed) holds a ``.`` or ``..`` segment, also
    percent-encoded or hidden behind an encoded slash or a backslash. Routes
    match the raw path, but a backend may normalise it: ``/open/../admin``
    would be routed by its ``/open`` prefix and served as ``/admin``.
    """
    path = path.partition("?")[0]
    if "." not in path and "%" not in path:
        return False  # the common case
    for segment in path.split("/"):
        if "." in segment or "%" in segment:
            for part in unquote(segment).replace("\\", "/").split("/"):
                if part in (".", ".."):
                    return True
    return False


@dataclass(frozen=True)
class RouteMatch:
    """What L{wsgateway.routing.router.Router.match} found: the route and what its pattern captured."""

    route: Any
    captures: Mapping[str, str]  # without the "**" key
    rest: str  # what /** matched; "" if nothing or no /**

