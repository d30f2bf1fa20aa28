# -*- test-case-name: tests.test_health -*-
"""
Connection errors, described for logs and ``/readyz``: one short, log-safe
reason whether a health probe, an upstream connect or an upstream handshake
failed.
"""

from __future__ import annotations

from twisted.internet import error

__all__ = ["describe_error"]


def describe_error(e: BaseException) -> str:
    """A short, log-safe reason for a connection error."""
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, error.TCPTimedOutError)):
        return "connect timed out"
    if isinstance(e, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    if isinstance(e, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed"
    if type(e).__module__.startswith("OpenSSL"):
        # OpenSSL's own fixed reasons, e.g. "certificate verify failed"
        reasons = [str(a[-1]) for a in (e.args[0] if e.args and isinstance(e.args[0], list) else [])
                   if isinstance(a, tuple) and a]
        return "TLS handshake failed" + (f": {', '.join(reasons)}" if reasons else "")
    if type(e).__module__.startswith("service_identity"):
        return "TLS handshake failed: the certificate does not match the host name"
    status = getattr(e, "status", None)
    if isinstance(status, int):  # upstream.UpstreamRefused, duck-typed (no import cycle)
        return f"handshake refused: status {status}"
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
