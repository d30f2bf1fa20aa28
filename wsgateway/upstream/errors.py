# -*- test-case-name: tests.unit.upstream.test_health -*-
"""
Connection errors, described for logs and ``/readyz``: one short, log-safe
reason whether a health probe, an upstream connect or an upstream handshake
failed.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure

__all__ = ["describe_error", "describe_failure"]


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


def describe_failure(f: Failure) -> str:
    """
    ``describe_error`` of the exception ``f`` holds. Twisted types
    ``Failure.value`` as Optional (it is None only inside the constructor),
    so this is the one place that says so.
    """
    value = f.value
    return describe_error(value) if value is not None else f.getErrorMessage()
