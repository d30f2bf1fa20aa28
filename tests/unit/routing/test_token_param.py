"""
The token query parameter is never forwarded, in any spelling the gateway's
parser or a framework behind it could read as the token (issue 16 item 12;
docs/protocol.md, "The token query parameter: read strictly, stripped widely").
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgateway.auth.credentials import extract_token
from wsgateway.config.auth import AuthConfig
from wsgateway.routing.patterns import RouteMatch
from wsgateway.routing.templates import is_token_param, query_params, upstream_target

TOKEN = "eyJ.secret.sig"

SPELLINGS = [
    "access_token",
    "ACCESS_TOKEN",
    "Access_Token",
    "access_token[]",
    "access_token[0]",
    "access_token%5B%5D",
    "access%5Ftoken",
    "access%5ftoken",
    "access%255Ftoken",  # decoded twice by some stacks
    "%61ccess_token",
    "access.token",  # PHP reads . and space as _
    "access+token",
    "access%20token",
    "access[token",  # PHP: an unclosed [ is _
    " access_token",
]


def _target(query: str) -> str:
    return upstream_target(RouteMatch(None, {}, ""), request_path=f"/chat?{query}", strip_prefix=False,
                           upstream_path=None, drop_query_param="access_token")


@pytest.mark.parametrize("name", SPELLINGS)
@pytest.mark.parametrize("sep", ["&", ";"])
def test_every_spelling_is_stripped_and_the_rest_kept(name: str, sep: str) -> None:
    target = _target(f"room=1{sep}{name}={TOKEN}&b=2")
    assert TOKEN not in target
    assert target == f"/chat?room=1&b=2"


@pytest.mark.parametrize("name", SPELLINGS)
def test_every_spelling_is_absent_from_query_templates(name: str) -> None:
    params = query_params(f"/chat?room=1;{name}={TOKEN}&b=2", drop="access_token")
    assert params == {"room": "1", "b": "2"}


def test_what_an_ampersand_only_parser_reads_as_the_token_goes_whole() -> None:
    """To such a parser the token is everything up to the next "&", ";" included: none of it is forwarded."""
    assert _target(f"access_token=;{TOKEN}&c=3") == "/chat?c=3"
    assert _target(f"ACCESS_TOKEN={TOKEN};a=1;b=2&c=3") == "/chat?c=3"
    assert _target(f"a=1;b=2;access_token={TOKEN};c=3&d=4") == "/chat?a=1;b=2;c=3&d=4"
    assert _target(f"access_token={TOKEN}") == "/chat"


@pytest.mark.parametrize("name", ["access_tokens", "access_token_x", "xaccess_token", "token", "access"])
def test_other_names_pass(name: str) -> None:
    assert _target(f"{name}=1") == f"/chat?{name}=1"
    assert not is_token_param(name, "access_token")


def test_the_gateway_reads_the_exact_name_only() -> None:
    """Its parser is strict: every spelling it reads is among those stripped, and it reads no variant."""
    cfg = AuthConfig(algorithms=("HS256",), secret="s" * 32)
    assert extract_token({}, f"a=1&access_token={TOKEN}", (), cfg)[0] == TOKEN
    assert extract_token({}, f"access%5Ftoken={TOKEN}", (), cfg)[0] == TOKEN
    for name in ["ACCESS_TOKEN", "access_token[]", "access.token"]:
        assert extract_token({}, f"{name}={TOKEN}", (), cfg)[0] is None
    assert extract_token({}, f"a=1;access_token={TOKEN}", (), cfg)[0] is None


_NAME_CHARS = st.sampled_from(list("acestok_[]%.+ ACESTOK5F;0"))


@settings(max_examples=300, deadline=None)
@given(st.text(_NAME_CHARS, min_size=1, max_size=16), st.sampled_from(["&", ";"]))
def test_property_whatever_the_gateway_reads_is_stripped(name: str, sep: str) -> None:
    query = f"x=1{sep}{name}={TOKEN}"
    cfg = AuthConfig(algorithms=("HS256",), secret="s" * 32)
    read, _, _ = extract_token({}, query, (), cfg)
    if read is not None:
        assert TOKEN not in _target(query)
        assert TOKEN not in "".join(query_params(f"/?{query}", drop="access_token").values())
