# -*- test-case-name: tests.test_routing -*-
"""
Path patterns, host and header matching, route precedence and templates.

Pure Python and reactor-free: the handshake code asks L{Router.match} for a
route and L{upstream_target} for the path to request upstream; config
validation uses L{compile_pattern}, L{check_host} and L{check_template} so a
bad route is reported before anything listens.

Everything matches on the raw request target, never a percent-decoded one, so
C{/a%2Fb} is one segment and the upstream sees exactly what the client sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, quote as _urlquote, unquote, unquote_plus

__all__ = [
    "PathPattern",
    "PatternError",
    "RouteMatch",
    "Router",
    "TemplateError",
    "check_host",
    "check_template",
    "compile_pattern",
    "query_params",
    "render_template",
    "template_fields",
    "upstream_target",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# A capture in a template may also name a value from the handshake.
_SOURCES = ("claims.", "query.", "header.")
# Key under which PathPattern.match returns what a final /** matched.
REST = "**"


class PatternError(ValueError):
    """
    A path pattern, host or template is malformed. The message is one short
    sentence; config.py prefixes the file, section and key.
    """


class TemplateError(KeyError):
    """
    A template field has no value for this connection.

    A KeyError so lookups-that-failed can be caught together, but with a
    readable str() (KeyError's would show the message in quotes).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.field = name

    def __str__(self) -> str:
        return f"no value for {{{self.field}}}"


# ---------------------------------------------------------------- patterns


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
        return self._match_parts(path[1:].split("/"))

    def _match_parts(self, parts: list[str]) -> dict[str, str] | None:
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


# ------------------------------------------------------------------- hosts


def _strip_port(value: str) -> str:
    """Host header -> lower-case host name without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        # A malformed literal is kept whole so it cannot match a real host.
        host = value[1:end] if end != -1 else value
    elif value.count(":") == 1:
        host = value.partition(":")[0]
    else:
        # A bare name, or an unbracketed IPv6 literal (which cannot carry a port).
        host = value
    return host[:-1] if host.endswith(".") else host


@dataclass(frozen=True)
class _HostRule:
    exact: str | None = None  # normalised host
    suffix: str | None = None  # ".example.com" for *.example.com

    def accepts(self, host: str | None) -> bool:
        if self.exact is None and self.suffix is None:
            return True
        if host is None:
            return False
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return len(host) > len(self.suffix) and host.endswith(self.suffix)


def _host_rule(host: str | None) -> _HostRule:
    if host is None or not host.strip():
        return _HostRule()
    value = host.strip().lower()
    if any(c.isspace() or c in "/?#@" for c in value):
        raise PatternError(f"host {host!r} is not a host name")
    if value.startswith("["):
        if not value.endswith("]") or len(value) < 3:
            raise PatternError(f"host {host!r}: unbalanced '[' (write an IPv6 host as [::1], without port)")
        return _HostRule(exact=value[1:-1])
    if value.count(":") == 1:
        raise PatternError(f"host {host!r} must not include a port")
    if value.count(":") > 1:
        return _HostRule(exact=value)  # a bare IPv6 literal
    if value.endswith("."):
        value = value[:-1]
    if "*" in value:
        suffix = value[1:]
        if not value.startswith("*.") or "*" in suffix or len(suffix) < 2 or ".." in suffix or suffix.endswith("."):
            raise PatternError(f"host {host!r}: a wildcard must be a leading '*.' as in '*.example.com'")
        return _HostRule(suffix=suffix)
    if not value or ".." in value or value.startswith("."):
        raise PatternError(f"host {host!r} is not a host name")
    return _HostRule(exact=value)


def check_host(host: str | None) -> None:
    """Validate a route's C{host} value; raises L{PatternError}."""
    _host_rule(host)


# ------------------------------------------------------------------ routing


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
    route: Any
    captures: Mapping[str, str]  # without the "**" key
    rest: str  # what /** matched; "" if nothing or no /**


@dataclass(frozen=True)
class _Entry:
    pattern: PathPattern
    host: _HostRule
    headers: tuple[tuple[str, str], ...]  # (lower-case name, exact value)
    route: Any


class Router:
    """
    Picks the most specific route for a handshake.

    Routes are sorted once by L{PathPattern.specificity} (stable, so equally
    specific routes keep their file order), which makes the first route that
    matches the winner.
    """

    def __init__(self, routes: Sequence[Any]) -> None:
        entries = [
            _Entry(
                pattern=compile_pattern(route.path),
                host=_host_rule(route.host),
                headers=tuple((name.strip().lower(), value) for name, value in (route.headers or ())),
                route=route,
            )
            for route in routes
        ]
        entries.sort(key=lambda e: e.pattern.specificity, reverse=True)
        self._entries: tuple[_Entry, ...] = tuple(entries)

    @property
    def routes(self) -> tuple[Any, ...]:
        """The routes in the order they are tried (most specific first)."""
        return tuple(e.route for e in self._entries)

    def match(self, path: str, host: str | None, headers: Mapping[str, str]) -> RouteMatch | None:
        """
        @param path: the raw request target; a C{?query} is ignored.
        @param host: the Host header, port allowed; L{None} if absent.
        @param headers: request headers with lower-case names.
        """
        path = path.partition("?")[0]
        if not path.startswith("/"):
            return None
        parts = path[1:].split("/")
        hostname = _strip_port(host) if host else None
        for entry in self._entries:
            if not entry.host.accepts(hostname):
                continue
            if entry.headers and not all(headers.get(name) == value for name, value in entry.headers):
                continue
            found = entry.pattern._match_parts(parts)
            if found is not None:
                rest = found.pop(REST, "")
                return RouteMatch(entry.route, found, rest)
        return None


# ---------------------------------------------------------------- templates


@lru_cache(maxsize=512)
def _parse_template(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """-> (texts, fields) with len(texts) == len(fields) + 1, interleaved."""
    texts: list[str] = []
    fields: list[str] = []
    start = 0
    while True:
        opening = template.find("{", start)
        closing = template.find("}", start)
        if closing != -1 and (opening == -1 or closing < opening):
            raise PatternError(f"'}}' without '{{' at character {closing + 1}")
        if opening == -1:
            texts.append(template[start:])
            return tuple(texts), tuple(fields)
        if closing == -1:
            raise PatternError(f"'{{' without '}}' at character {opening + 1}")
        inner = template.find("{", opening + 1)
        if inner != -1 and inner < closing:
            raise PatternError(f"nested '{{' at character {inner + 1}")
        name = template[opening + 1 : closing]
        if not name:
            raise PatternError(f"empty field '{{}}' at character {opening + 1}")
        texts.append(template[start:opening])
        fields.append(name)
        start = closing + 1


def template_fields(template: str) -> tuple[str, ...]:
    """The field names of a template, in order; raises L{PatternError}."""
    return _parse_template(template)[1]


def check_template(template: str, captures: Iterable[str]) -> None:
    """
    Raise L{PatternError} unless every field is one of C{captures} or
    C{claims.X}, C{query.X}, C{header.X} with a non-empty C{X}.
    """
    known = set(captures)
    for name in template_fields(template):
        if name in known:
            continue
        if any(name.startswith(src) and len(name) > len(src) for src in _SOURCES):
            continue
        choices = ", ".join(f"{{{c}}}" for c in sorted(known)) or "none"
        raise PatternError(
            f"unknown field '{{{name}}}': not a capture of the path (captures: {choices}) "
            "nor claims.NAME, query.NAME or header.NAME"
        )


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    # An exact key wins, so URL-style claim names with dots still work;
    # otherwise "a.b" walks nested objects (e.g. Keycloak's realm_access.roles).
    if name in claims:
        return claims[name]
    node: Any = claims
    for key in name.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _scalar_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"  # as in the JSON the claim came from
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)


def _claim_text(value: Any) -> str | None:
    """
    Claim value -> text: strings as they are, booleans as true/false,
    numbers with str(), lists/tuples as their items joined with "," (each
    item by the same rule, non-scalar items as compact JSON), objects as
    compact JSON. None (absent or JSON null) has no text.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(_scalar_text(item) for item in value)
    return _scalar_text(value)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lower = name.lower()
    value = headers.get(lower)
    if value is None:
        # Tolerate a mapping that kept the client's spelling.
        for key, candidate in headers.items():
            if key.lower() == lower:
                return candidate
    return value


def render_template(
    template: str,
    *,
    captures: Mapping[str, str],
    claims: Mapping[str, Any] | None = None,
    query: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    quote: bool = False,
) -> str:
    """
    Fill a template. A field whose value is absent, null or renders as the
    empty string raises L{TemplateError}: an empty value would otherwise put
    every such client in one shared channel (C{user:}) or path (C{/rooms/}).

    With C{quote=True} each claims./query./header. value is percent-encoded
    with no safe characters, so it stays inside its path segment; captures
    are inserted raw (they already are one raw path segment).
    """
    texts, fields = _parse_template(template)
    out = [texts[0]]
    for name, text in zip(fields, texts[1:]):
        value: str | None
        external = True
        if name in captures:
            value = captures[name]
            external = False
        elif name.startswith("claims.") and claims is not None:
            value = _claim_text(_claim(claims, name[len("claims.") :]))
        elif name.startswith("query.") and query is not None:
            value = query.get(name[len("query.") :])
        elif name.startswith("header.") and headers is not None:
            value = _header(headers, name[len("header.") :])
        else:
            value = None
        if not value:
            raise TemplateError(name)
        out.append(_urlquote(value, safe="") if quote and external else value)
        out.append(text)
    return "".join(out)


# ----------------------------------------------------------------- upstream


def query_params(request_path: str, *, drop: str | None = None) -> dict[str, str]:
    """
    The decoded query parameters of a request target for C{{query.X}}
    templates; the first occurrence of a repeated name wins. C{drop} (the
    token parameter) is left out so no template can forward the token.
    """
    _, _, query = request_path.partition("?")
    result: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name != drop:
            result.setdefault(name, value)
    return result


def _filter_query(query: str, drop: str | None) -> str:
    kept = []
    for part in query.split("&"):
        if not part:
            continue
        # Compare the decoded name: the token parser decodes it, so
        # "access%5Ftoken=..." must not slip through to the upstream.
        if drop is not None and unquote_plus(part.partition("=")[0]) == drop:
            continue
        kept.append(part)
    return "&".join(kept)


def upstream_target(
    match: RouteMatch,
    *,
    request_path: str,
    strip_prefix: bool,
    upstream_path: str | None,
    drop_query_param: str | None,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """
    The path and query to request from the upstream for this handshake.

    The client's query is appended minus every C{drop_query_param}
    parameter, the others byte-for-byte in their order. A template that
    carries its own C{?} gets the client's parameters after an C{&}.
    Raises L{TemplateError} when the template needs a value the
    connection lacks.
    """
    path, _, query = request_path.partition("?")
    if upstream_path:
        target = render_template(
            upstream_path,
            captures=match.captures,
            claims=claims,
            query=query_params(request_path, drop=drop_query_param),
            headers=headers,
            quote=True,
        )
    elif strip_prefix:
        target = match.rest or "/"
    else:
        target = path
    kept = _filter_query(query, drop_query_param)
    if not kept:
        return target
    return f"{target}{'&' if '?' in target else '?'}{kept}"
