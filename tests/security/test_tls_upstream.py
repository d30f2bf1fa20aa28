"""
wss:// upstreams that must not be trusted (docs/configuration.md [upstream] tls_ca:
"hostname verified").

tests/test_tls_routing.py already checks the 502 for a certificate naming
another host and one from an untrusted CA, each on a gateway of its own.
Here the same refusals happen on the long-lived main gateway next to a good
wss upstream, and what is added is the operator's side: the log line names
the node and says why, while the client learns nothing beyond 502.
"""

from __future__ import annotations

import re

import pytest

from support.waiting import wait_for

from .helpers import Main, echo_ok, handshake, json_events, refused, say_goodbye, uid


def test_wss_upstream_with_a_valid_certificate_is_relayed(main: Main) -> None:
    """The control case: the two refusals below are about the certificates, not about wss."""
    path = "/tls-good/" + uid("good")
    line, _, sock, reader = handshake(main.port, path)
    assert line == "HTTP/1.1 101 Switching Protocols"
    echo_ok(sock, reader, b"over wss")
    say_goodbye(sock, reader)


@pytest.mark.parametrize(
    "route, why",
    [
        # service_identity's verdict, or OpenSSL's when it checks the name itself
        ("tls-wronghost", r"(?i)hostname|mismatch|doesn't match|does not match|VerificationError"),
        ("tls-untrusted", r"(?i)certificate verify failed|unable to get local issuer|self.signed|unknown ca"),
    ],
    ids=["wronghost", "untrusted"],
)
def test_untrusted_wss_upstream_is_502_and_the_log_says_why(main: Main, route: str, why: str) -> None:
    node = main.tls_nodes[route]
    before = len(json_events(main.gw))
    line, headers = refused(main.port, f"/{route}/" + uid("tls"))
    assert line == "HTTP/1.1 502 Bad Gateway"
    assert all("certificate" not in v.lower() for _, v in headers), headers

    def explained() -> list[str]:
        return [
            str(e.get("event", ""))
            for e in json_events(main.gw)[before:]
            if e.get("level") in ("warn", "error") and node in str(e.get("event", "")) + str(e.get("node", ""))
        ]

    assert wait_for(lambda: explained(), 3), f"no warning naming {node}"
    assert any(re.search(why, text) for text in explained()), explained()
