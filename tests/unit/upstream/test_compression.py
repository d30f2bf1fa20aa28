"""permessage-deflate negotiation rules (RFC 7692 section 7; wsgateway/upstream/compression.py)."""

from __future__ import annotations

import pytest

from wsgateway.upstream.compression import (
    BadExtensions,
    Deflate,
    accepted,
    accepts,
    answer_in,
    for_client,
    offers_header,
    offers_in,
)


@pytest.mark.parametrize(
    ("header", "offers"),
    [
        (None, ()),
        ("", ()),
        ("permessage-deflate", (Deflate(),)),
        ("permessage-deflate; client_max_window_bits", (Deflate(client_max_window_bits=0),)),
        ("Permessage-Deflate; Server_Max_Window_Bits=\"10\"", (Deflate(server_max_window_bits=10),)),
        ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover, foo",
         (Deflate(server_no_context_takeover=True),)),
        # an offer RFC 7692 does not allow is declined (dropped), the next one kept
        ("permessage-deflate; server_max_window_bits=16, permessage-deflate",
         (Deflate(),)),
        ("permessage-deflate; client_no_context_takeover=1", ()),
        ("permessage-deflate; server_max_window_bits", ()),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", ()),
        ("permessage-deflate; mystery", ()),
        ('permessage-deflate; server_max_window_bits="10', ()),  # does not parse: nothing
    ],
)
def test_offers_in(header: str | None, offers: tuple[Deflate, ...]) -> None:
    assert offers_in(header) == offers


def test_offers_are_passed_on_in_a_canonical_form() -> None:
    offers = offers_in("permessage-deflate;client_max_window_bits;server_no_context_takeover, permessage-deflate")
    assert offers_header(offers) == (
        "permessage-deflate; server_no_context_takeover; client_max_window_bits, permessage-deflate"
    )


@pytest.mark.parametrize(
    ("offer", "answer", "ok"),
    [
        ("permessage-deflate", "permessage-deflate", True),
        ("permessage-deflate", "permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
        ("permessage-deflate", "permessage-deflate; server_max_window_bits=10", True),  # the server limits itself
        ("permessage-deflate", "permessage-deflate; client_max_window_bits=10", False),  # not offered
        ("permessage-deflate; client_max_window_bits", "permessage-deflate; client_max_window_bits=9", True),
        ("permessage-deflate; client_max_window_bits=10", "permessage-deflate; client_max_window_bits=11", False),
        ("permessage-deflate; server_max_window_bits=10", "permessage-deflate", False),  # must say its window
        ("permessage-deflate; server_max_window_bits=10", "permessage-deflate; server_max_window_bits=12", False),
        ("permessage-deflate; server_max_window_bits=10", "permessage-deflate; server_max_window_bits=9", True),
        ("permessage-deflate; server_no_context_takeover", "permessage-deflate", False),
    ],
)
def test_accepts(offer: str, answer: str, ok: bool) -> None:
    assert accepts(offers_in(offer)[0], answer_in(answer)) is ok


def test_an_answer_is_checked_against_every_offer() -> None:
    offers = offers_in("permessage-deflate; server_max_window_bits=10, permessage-deflate")
    assert accepted(offers, answer_in("permessage-deflate"))  # the second offer
    assert not accepted((), answer_in("permessage-deflate"))


@pytest.mark.parametrize(
    "answer",
    ["", "x-other", "permessage-deflate, permessage-deflate", "permessage-deflate; client_max_window_bits",
     "permessage-deflate; server_max_window_bits=7", "permessage-deflate; what"],
)
def test_answers_that_are_not_one_valid_permessage_deflate(answer: str) -> None:
    with pytest.raises(BadExtensions):
        answer_in(answer)


def test_the_client_is_answered_the_upstreams_answer_without_client_context() -> None:
    assert for_client(answer_in("permessage-deflate; server_max_window_bits=12")) == (
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=12"
    )
    assert for_client(answer_in("permessage-deflate; client_no_context_takeover")) == (
        "permessage-deflate; client_no_context_takeover"
    )
