"""
Property-based fuzzing (hypothesis, bounded) of the code that reads untrusted
text outside Autobahn: routing (request targets, Host), the upstream header
set, token extraction and verification, and the config loader.

tests/test_routing.py already proves the router right on well-formed input
(built paths match, precedence, byte-for-byte query forwarding); here the
input is hostile: percent-encoding, dot segments, NUL and controls, non-ASCII,
very long text. The properties are the security ones: never an exception
other than the documented one, never a decoded or normalised match, never
the token parameter forwarded, never a header line that splits, never a
secret quoted in a config error.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import time
from ipaddress import ip_network
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from wsgateway.routing import router as routing
from wsgateway.auth.credentials import extract_token
from wsgateway.auth.identity import AuthFailed, UnknownKey
from wsgateway.auth.keys import KeySet
from wsgateway.auth.verifier import TokenVerifier
from wsgateway.config.auth import AuthConfig
from wsgateway.config.loader import ConfigError, GatewayConfig, load
from wsgateway.handshake.headers import HeaderInjection, upstream_headers
from wsgateway.routing.patterns import PatternError, compile_pattern
from wsgateway.routing.router import Router
from wsgateway.routing.templates import TemplateError, upstream_target

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text an attacker controls: request targets and header values as Autobahn
# hands them over (decoded as Latin-1, so U+0000-U+00FF), plus full Unicode
# where the text comes from a JWT claim.
LATIN1 = st.characters(min_codepoint=0, max_codepoint=0xFF)
PIECES = st.sampled_from(
    [
        "..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2f", "%2F", "%5c", "\\", "%00", "\x00", "\x01", "\x7f", "\x85",
        "%", "%%", "%zz", "?", "#", ";", "//", "/", "é", "\u2028", "ſ", "K", "open", "auth", "admin", "rooms",
        "access_token", "=", "&", "+", " ", "\t", "{room}", "**", "*",
    ]
)


@st.composite
def hostile_text(draw: st.DrawFn, alphabet: st.SearchStrategy[str] = LATIN1, max_pieces: int = 12) -> str:
    parts = draw(st.lists(st.one_of(PIECES, st.text(alphabet, max_size=4)), max_size=max_pieces))
    return "".join(parts)


@st.composite
def targets(draw: st.DrawFn) -> str:
    """A request target: '/' then hostile segments, maybe a hostile query."""
    segs = draw(st.lists(hostile_text(max_pieces=4), max_size=8))
    path = "/" + "/".join(segs)
    if draw(st.booleans()):
        path += "?" + draw(hostile_text())
    return path


# -- routing ------------------------------------------------------------------------


@FUZZ
@given(hostile_text(st.characters(blacklist_categories=("Cs",)), max_pieces=16))
@example("/" + "a/" * 5000 + "**")
@example("/{" + "x" * 10000 + "}")
@example("/a\x00b/**")
@example("/%2e%2e/**")
def test_compile_pattern_takes_any_text(source: str) -> None:
    try:
        pattern = compile_pattern(source)
    except PatternError:
        return
    assert pattern.source == source
    segments = source[1:].split("/")
    # what compiled is only ever literal, {capture} or a final **: no dot segment, no control
    assert not {".", ".."} & set(segments)
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in source)


ROUTES = [
    ("open", "/open/**"),
    ("auth", "/auth/**"),
    ("admin", "/admin/{tenant}/**"),
    ("room", "/rooms/{room}"),
    ("root", "/"),
]


class _Route:
    def __init__(self, name: str, path: str, host: str | None = None) -> None:
        self.name, self.path, self.host, self.headers = name, path, host, ()


ROUTER = Router([_Route(n, p) for n, p in ROUTES] + [_Route("hosted", "/h/**", "*.example.com")])
LITERALS = {n: [s for s in p[1:].split("/") if s and s != "**" and not s.startswith("{")] for n, p in ROUTES}


@FUZZ
@given(targets(), st.one_of(st.none(), hostile_text()))
@example("/open/../auth/x", None)
@example("/op%65n/x", None)
@example("/rooms/a%2Fb", None)
@example("/rooms/", None)
@example("/h/x", "evil.com\x00.example.com")
@example("/" + "a/" * 20000, None)
def test_router_matches_raw_segments_only(target: str, host: str | None) -> None:
    found = ROUTER.match(target, host, {})
    if found is None:
        return
    raw = target.partition("?")[0][1:].split("/")
    name = found.route.name
    if name == "hosted":
        assert host is not None and routing._strip_port(host).endswith(".example.com")
        return
    # literal segments compare raw: no percent-decoding, no case folding, no dot handling
    assert raw[: len(LITERALS[name])] == LITERALS[name] or name == "root"
    if name == "root":
        assert raw == [""]
    for value in found.captures.values():
        assert value and "/" not in value and "?" not in value
    if name == "room":
        assert len(raw) == 2 and found.captures["room"] == raw[1]


QUERY_PIECES = st.sampled_from(
    [
        "access_token=T0K", "access%5Ftoken=T0K", "access%5ftoken=T0K", "%61ccess_token=T0K", "access_token",
        "access_token=", "access+token=x", "ACCESS_TOKEN=x", "access_token%3DT0K", "access_token=T0K%26b%3D1",
        "access_token[]=T0K", "a=1", "b=%26access_token%3DT0K", "=", "&", ";access_token=T0K", "x=1;y=2",
        "access_token=T0K#frag", "%", "%zz=1",
    ]
)


@FUZZ
@given(st.lists(st.one_of(QUERY_PIECES, hostile_text(max_pieces=3)), max_size=8), st.booleans())
def test_upstream_target_never_forwards_the_token_parameter(pieces: list[str], strip: bool) -> None:
    query = "&".join(pieces)
    target = "/open/x?" + query
    found = ROUTER.match(target, None, {})
    assert found is not None
    try:
        out = upstream_target(found, request_path=target, strip_prefix=strip, upstream_path=None,
                              drop_query_param="access_token")
    except TemplateError:
        pytest.fail("no template here, nothing can be missing")
    _, _, forwarded = out.partition("?")
    # what the upstream will decode, and what extract_token decodes, never names the token
    assert all(name != "access_token" for name, _ in parse_qsl(forwarded, keep_blank_values=True))
    # and the token extraction agrees: whatever it would take from the client's query is gone
    token, source, _ = extract_token({}, query, (), AuthConfig())
    if source == "query":
        assert ("access_token", token) not in parse_qsl(forwarded, keep_blank_values=True)


# -- the upstream header set ----------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


def _splits(value: str) -> bool:
    """A value an upstream could read as more than one line, however it decodes our UTF-8."""
    if len(value.splitlines()) > 1 or value.endswith(("\n", "\r")):
        return True
    latin = value.encode("utf-8", "surrogatepass").decode("latin-1")
    return len(latin.splitlines()) > 1 or any(c in latin for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85")


def _control(value: str) -> bool:
    return any((ord(c) < 0x20 and c != "\t") or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in value)


NAMES = st.one_of(
    st.sampled_from(["x-note", "x-user-id", "x-forwarded-for", "x-request-id", "traceparent", "cookie",
                     "authorization", "connection", "host", "x-api-key", "forwarded", "x-real-ip"]),
    hostile_text(max_pieces=3).map(str.lower),
)


@FUZZ
@given(
    st.dictionaries(NAMES, hostile_text(), max_size=8),
    st.dictionaries(st.sampled_from(["X-User-Id", "X-User-Roles"]), hostile_text(st.characters(), max_pieces=6)),
    st.booleans(),
)
@example({"x-note": "a\r\nX-User-Id: admin"}, {}, False)
@example({"x-note": "\u0145"}, {}, False)  # U+0145 is C5 85 in UTF-8: NEL for a Latin-1 reader
@example({}, {"X-User-Id": "ali\u2028ce"}, False)
@example({"x-forwarded-for": "6.6.6.6\r\nX-Evil: 1"}, {}, True)
def test_upstream_headers_never_emit_a_splitting_or_control_value(
    client: dict[str, str], added: dict[str, str], trusted: bool
) -> None:
    try:
        out, rid, trace_id = upstream_headers(
            client,
            peer_ip="127.0.0.1",
            secure=False,
            trusted_proxies=[ip_network("127.0.0.0/8")] if trusted else [],
            extra_identity=frozenset({"x-user-id", "x-user-roles", "x-api-key"}),
            added=added,
        )
    except HeaderInjection:
        return
    lowered = [name.lower() for name in out]
    assert len(set(lowered)) == len(lowered), f"a header twice: {sorted(out)}"
    for name, value in out.items():
        assert _TOKEN.match(name), repr(name)
        assert not _splits(value), (name, value)
        assert not _control(value), (name, value)
    if not trusted:
        assert out["X-Forwarded-For"] == "127.0.0.1"
    for name, value in added.items():
        assert out[name] == value
    for owned in ("x-user-id", "x-user-roles", "x-api-key"):
        if owned in client and owned.title() not in {n.title() for n in added}:
            assert owned not in lowered


# -- tokens ----------------------------------------------------------------------------

PROTOCOLS = st.lists(
    st.one_of(st.sampled_from(["chat", "bearer.", "bearer.abc", "bearer.bearer.x", "Bearer.x", "bearer"]),
              hostile_text(max_pieces=3)),
    max_size=6,
)


@FUZZ
@given(
    st.one_of(st.none(), hostile_text(), st.sampled_from(["Bearer ", "bearer x", "Bearer  a b", "Basic x", "Bearer\tx"])),
    st.one_of(hostile_text(), st.lists(QUERY_PIECES, max_size=5).map("&".join)),
    PROTOCOLS,
    st.sampled_from(["access_token", ""]),
    st.sampled_from(["bearer.", ""]),
)
def test_extract_token_is_total_and_consistent(
    authorization: str | None, query: str, protocols: list[str], param: str, prefix: str
) -> None:
    cfg = AuthConfig(query_param=param, subprotocol_prefix=prefix)
    headers = {} if authorization is None else {"authorization": authorization}
    token, source, remaining = extract_token(headers, query, protocols, cfg)
    assert (token is None) == (source is None)
    assert source in (None, "header", "query", "subprotocol")
    if token is not None:
        assert token != ""
    # what is left to offer upstream: the client's own order, no bearer entry at all
    it = iter(protocols)
    assert all(any(p == q for q in it) for p in remaining), (protocols, remaining)
    if prefix:
        assert not any(p.startswith(prefix) for p in remaining)
    else:
        assert list(remaining) == list(protocols)
    if source == "header":
        assert authorization is not None and token in authorization and token == token.strip()
    if source == "subprotocol":
        assert prefix and prefix + token in protocols
    if source == "query":
        assert param and (param, token) in parse_qsl(query, keep_blank_values=True)


SECRET = "fuzz-" + "s" * 40
HS_VERIFIER = TokenVerifier(AuthConfig(algorithms=("HS256",), secret=SECRET, leeway=0))


def _b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
HEADERS = st.fixed_dictionaries(
    {"alg": st.one_of(st.sampled_from(["HS256", "none", "None", "HS512", "RS256", "", "hs256"]), JSONISH)},
    optional={"kid": JSONISH, "typ": JSONISH, "crit": JSONISH, "jwk": JSONISH, "b64": st.booleans()},
)
CLAIMS = st.one_of(
    st.fixed_dictionaries({"exp": st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=4), JSONISH)},
                          optional={"nbf": JSONISH, "iat": JSONISH, "sub": JSONISH, "aud": JSONISH}),
    JSONISH,
)


@st.composite
def forged_tokens(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["structured", "text", "bytes"]))
    if kind == "text":
        return draw(hostile_text(st.characters(blacklist_categories=("Cs",)), max_pieces=10))
    head = draw(HEADERS) if kind == "structured" else draw(st.binary(max_size=40))
    body = draw(CLAIMS) if kind == "structured" else draw(st.binary(max_size=40))
    sig = draw(st.binary(max_size=48))
    return f"{_b64(head)}.{_b64(body)}.{_b64(sig)}"


@FUZZ
@given(forged_tokens())
@example("..")
@example("a.b.c.d")
@example(_b64({"alg": "HS256"}) + "." + _b64({"exp": 1e308}) + ".")
def test_token_verification_refuses_forgeries_with_auth_failed_only(token: str) -> None:
    with pytest.raises(AuthFailed) as info:
        HS_VERIFIER.verify(token)
    assert info.value.status == 401


RS_KEYS = KeySet({"keys": [{"kty": "RSA", "kid": "k1", "n": _b64(b"\xc1" * 256), "e": "AQAB", "alg": "RS256"}]})
RS_VERIFIER = TokenVerifier(AuthConfig(algorithms=("RS256",), jwks_file="unused", leeway=0), keys=RS_KEYS)


@FUZZ
@given(forged_tokens())
def test_jwks_verification_refuses_forgeries_with_auth_failed_or_unknown_key(token: str) -> None:
    with pytest.raises((AuthFailed, UnknownKey)):
        RS_VERIFIER.verify(token)


def test_a_genuine_token_passes_the_fuzzed_verifier() -> None:
    """The control case: the verifier above is not refusing everything."""
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert HS_VERIFIER.verify(token).subject == "u"


# -- the config loader ---------------------------------------------------------------------

KEYS = st.sampled_from(
    ["listen", "secret", "token", "algorithms", "path", "upstream", "nodes", "url", "allowed_origins", "roles",
     "trusted_proxies", "max_message_size", "leeway", "public_key_file", "forward_claims", "level", "tls_ca",
     "auth", "mode", "bogus", "Secret", "secret ", "query_param"]
)
SECTIONS = st.sampled_from(
    ["gateway", "limits", "auth", "admin", "log", "redis", "queue", "route:r", "upstream:u", "route:", "DEFAULT",
     "Auth", "upstream:u u", "demo"]
)
VALUES = st.one_of(
    st.sampled_from(["tcp:0:interface=127.0.0.1", "ssl:0:privateKey=nope.pem", "unix:nope.sock", "HS256", "RS256",
                     "none", "/**", "/a/{b}", "u", "ws://127.0.0.1:1", "wss://h:0", "env:NOPE", "file:nope.txt",
                     "1M", "-1", "1e9", "yes", "required", "https://*.example.com", "sub=X-User-Id", "10.0.0.0/8",
                     "%(x)s", "${x}", "\\", "'", '"']),
    hostile_text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n[]"), max_pieces=4),
)


@st.composite
def ini_files(draw: st.DrawFn) -> tuple[str, list[str], dict[str, str]]:
    """INI text with secrets in the places secrets go; returns (text, the secrets, environ)."""
    secrets = [
        "Zq" + draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=";#=[]%$\\"),
                            min_size=10, max_size=70))
        for _ in range(4)
    ]
    assume(all(len(set(s)) > 4 for s in secrets))
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        lines.append(f"[{draw(SECTIONS)}]")
        for _ in range(draw(st.integers(0, 5))):
            lines.append(f"{draw(KEYS)} = {draw(VALUES)}")
    placements = [
        ["[auth]", f"algorithms = {draw(st.sampled_from(['HS256', 'HS512', 'RS256', 'none', '']))}",
         f"secret = {secrets[0]}"],
        ["[admin]", f"token = {secrets[1]}", f"listen = {draw(VALUES)}"],
        ["[redis]", f"url = {draw(st.sampled_from(['redis', 'rediss', 'http', 'redis+x']))}://:{secrets[2]}@"
                    f"{draw(st.sampled_from(['127.0.0.1', '', '[::1', 'h:x']))}/0"],
        [secrets[3]],  # a secret pasted on a line of its own, without "key ="
        ["[auth]", "secret = env:WSGW_FUZZ_SECRET"],
    ]
    for block in draw(st.permutations(placements))[: draw(st.integers(1, len(placements)))]:
        lines.extend(block)
    lines = draw(st.permutations(lines)) if draw(st.booleans()) else lines
    return "\n".join(lines) + "\n", secrets, {"WSGW_FUZZ_SECRET": secrets[0][::-1]}


@FUZZ_SLOW
@given(ini_files())
def test_config_load_raises_only_config_error_and_never_quotes_a_secret(case: tuple[str, list[str], dict[str, str]]) -> None:
    text, secrets, environ = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gw.ini"
        path.write_text(text)
        try:
            config = load(str(path), environ=environ)
        except ConfigError as e:
            message = str(e) + "\n".join(e.errors)
            for secret in [*secrets, *environ.values()]:
                assert secret not in message, f"a secret is quoted in:\n{message}"
            assert all(line.startswith(str(path)) for line in e.errors), e.errors
            return
    assert isinstance(config, GatewayConfig)


def test_fuzzed_config_loader_accepts_a_valid_file(tmp_path: Path) -> None:
    """The control case: the loader above is not refusing everything."""
    path = tmp_path / "ok.ini"
    path.write_text("[gateway]\nlisten = tcp:0:interface=127.0.0.1\n[upstream:u]\nnodes = ws://127.0.0.1:1\n"
                    "[route:r]\npath = /**\nupstream = u\n")
    assert load(str(path), environ={}).routes[0].name == "r"
