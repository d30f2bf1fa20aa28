"""
The Host header as the gateway reads it (docs/configuration.md, issue 16 item 4):
C{split_host} accepts C{host[:port]} only, and C{host} route rules match
whole labels of a valid name, never a suffix of some other text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgateway.routing.patterns import PatternError
from wsgateway.routing.router import Router, check_host, split_host


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


# The request hosts of the attack report: each got 101 on a route restricted to
# *.internal.example, and went upstream as X-Forwarded-Host.
MALFORMED = [
    "evil.example, a.internal.example",
    "evil.example,a.internal.example",
    "evil.example/a.internal.example",
    "evil.example a.internal.example",
    "evil.example?a.internal.example",
    "evil.example;a.internal.example",
    "evil.example\ta.internal.example",
    "evil.example#a.internal.example",
    "user@a.internal.example",
    "a.internal.example:99999",
    "a.internal.example:0",
    "a.internal.example:",
    "a.internal.example:80:80",
    "a.internal.example:8o",
    "a.internal.example:+80",
    "a.internal.example:٨٠",  # Arabic-Indic digits: int() would take them
    "a..internal.example",
    ".a.internal.example",
    "a.internal.example..",
    "ä.internal.example",
    "a.internal.example\x00",
    "::1",  # an IPv6 literal must be bracketed
    "[::1",
    "[::1]x",
    "[::1]:99999",
    "[fe80::1%25eth0]",
    "[fe80::1%eth0]",
    "[not-ipv6]",
    "[]",
    "",
    "   ",
    ":443",
    "a" * 64 + ".internal.example",  # a label over 63 characters
    ("a" * 60 + ".") * 5 + "internal.example",  # a name over 253 characters
]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_host_is_no_host(value: str) -> None:
    assert split_host(value) is None


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_host_matches_no_host_route(value: str) -> None:
    router = Router([Route("internal", "/**", host="*.internal.example"), Route("exact", "/**", host="a.internal.example")])
    assert router.match("/x", value, {}) is None


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("a.internal.example", ("a.internal.example", None)),
        ("A.Internal.Example:8443", ("a.internal.example", 8443)),
        ("a.internal.example.:443", ("a.internal.example", 443)),
        ("a.internal.example:1", ("a.internal.example", 1)),
        ("a.internal.example:65535", ("a.internal.example", 65535)),
        ("a.internal.example:080", ("a.internal.example", 80)),
        ("_srv.internal.example", ("_srv.internal.example", None)),
        ("xn--bcher-kva.example", ("xn--bcher-kva.example", None)),
        ("localhost", ("localhost", None)),
        (" localhost:8080 ", ("localhost", 8080)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]", ("::1", None)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:DB8:0:0::1]:443", ("2001:db8::1", 443)),
        ("a" * 63 + ".example", ("a" * 63 + ".example", None)),
    ],
)
def test_valid_host(value: str, parsed: tuple[str, int | None]) -> None:
    assert split_host(value) == parsed


@pytest.mark.parametrize(
    "route_host, request_host, matches",
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com:8080", True),
        ("*.example.com", "evilexample.com", False),
        ("*.example.com", "x, a.example.com", False),
        ("*.example.com", "x a.example.com", False),
        ("*.example.com", "x/a.example.com", False),
        ("*.example.com", "a.example.com:99999", False),
        ("example.com", "example.com:99999", False),
        ("example.com", "x;example.com", False),
        ("[::1]", "[0:0::1]:80", True),
        ("::1", "[::1]", True),
        ("[::1]", "::1", False),
    ],
)
def test_host_rules_match_whole_labels_of_a_valid_host(route_host: str, request_host: str, matches: bool) -> None:
    assert (Router([Route("r", "/**", host=route_host)]).match("/", request_host, {}) is not None) is matches


@pytest.mark.parametrize("host", ["exa;mple.com", "a,b.example.com", "*.exa;mple.com", "ex%61mple.com", "ä.example",
                                  "[::g]", "[fe80::1%eth0]", "1::2::3"])
def test_host_rule_that_no_valid_host_could_match_is_a_config_error(host: str) -> None:
    with pytest.raises(PatternError):
        check_host(host)


_LABELS = st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LABELS, min_size=1, max_size=4), st.text(max_size=6))
def test_property_a_wildcard_rule_never_matches_text_glued_before_the_suffix(labels: list[str], junk: str) -> None:
    """Whatever precedes `.example.com` in a Host that passes is whole labels; anything else is refused."""
    router = Router([Route("r", "/**", host="*.example.com")])
    host = junk + ".".join(labels) + ".example.com"
    found = router.match("/", host, {})
    parsed = split_host(host)
    if found is not None:
        assert parsed is not None and parsed[0].endswith(".example.com")
        prefix = parsed[0][: -len(".example.com")]
        assert all(label and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
                   for label in prefix.split("."))
