# -*- test-case-name: tests.unit.routing.test_routing -*-
"""
Templates (a route's C{channel}, C{upstream_path}...) filled from the path's
captures, the token's claims, the query and the headers, and
L{upstream_target}: the path and query a handshake requests upstream.
Pure Python and reactor-free; config validation uses L{check_template} so a
bad template is reported before anything listens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus
from urllib.parse import quote as _urlquote

from wsgateway.routing.patterns import PatternError, RouteMatch

__all__ = [
    "TemplateError", "check_template", "is_token_param", "query_params", "render_template", "template_fields",
    "upstream_target",
]

# A capture in a template may also name a value from the handshake.
_SOURCES = ("claims.", "query.", "header.")


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


def _param_spelling(name: str) -> str:
    """
    The spelling-blind form of a query parameter name: percent- and
    ``+``-decoded until stable (a few rounds: some stacks decode twice),
    trimmed, lower case (ASP.NET reads names case-insensitively), a
    ``[...]`` suffix cut (PHP and Rails read ``x[]`` and ``x[k]`` as ``x``)
    and ``.``, space and an unclosed ``[`` read as ``_`` (PHP's mangling).
    """
    for _ in range(3):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    name = name.strip(" \t\x00").lower()
    bracket = name.find("[")
    if bracket >= 0 and "]" in name[bracket:]:
        name = name[:bracket]
    return name.replace(".", "_").replace(" ", "_").replace("[", "_")


def is_token_param(name: str, param: str | None) -> bool:
    """
    Whether a query parameter named ``name`` (as sent, still encoded) could
    be read as the token parameter ``param`` by the gateway or by any
    framework behind it. The gateway's own parser (auth/credentials.py)
    reads only the exact decoded name; this is deliberately wider, so what
    is stripped is a superset of what is read.
    """
    return param is not None and _param_spelling(name) == _param_spelling(param)


def _without_token(param: str, drop: str | None) -> str:
    """
    One ``&``-separated parameter minus every ``;``-separated part of it
    that names the token parameter (older stacks split on ``;`` too); the
    parameter itself, byte for byte, when there is none; "" when nothing is
    left.
    """
    if drop is None:
        return param
    # whole, as the gateway's parser reads it: "access_token=a;b" is all token to it
    if is_token_param(param.partition("=")[0], drop):
        return ""
    if ";" not in param:
        return param
    parts = param.split(";")
    kept = [part for part in parts if not is_token_param(part.partition("=")[0], drop)]
    if len(kept) == len(parts):
        return param
    return ";".join(part for part in kept if part)


def query_params(request_path: str, *, drop: str | None = None) -> dict[str, str]:
    """
    The decoded query parameters of a request target for C{{query.X}}
    templates; the first occurrence of a repeated name wins. Every spelling
    of C{drop} (the token parameter, L{is_token_param}) is left out, also as
    a ``;``-separated part of another parameter, so no template can forward
    the token.
    """
    _, _, query = request_path.partition("?")
    result: dict[str, str] = {}
    for param in query.split("&"):
        param = _without_token(param, drop)
        if not param:
            continue
        raw_name, _, raw_value = param.partition("=")
        result.setdefault(unquote_plus(raw_name), unquote_plus(raw_value))
    return result


def _filter_query(query: str, drop: str | None) -> str:
    kept = []
    for param in query.split("&"):
        param = _without_token(param, drop)
        if param:
            kept.append(param)
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

    The client's query is appended minus every spelling of the
    C{drop_query_param} parameter (L{is_token_param}), the others
    byte-for-byte in their order. A template that
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
