"""
Shared by the compatibility tests (``tests/unit/compat``).

wsgateway leans on private names and undocumented behaviours of a few
libraries (an inventory: ``tests/unit/compat/README.md``). Each test here checks
one of them, with no daemon and no network, and on failure says which
library changed what, the versions the test was last checked against, and
which of our files to revisit::

    AssertionError: twisted 27.1.0 changed tcp.Server._tempDataLen
    (checked against twisted 26.10): revisit wsgateway/_compat/sendnow.py

Run them first after any dependency upgrade::

    python -m pytest tests/unit/compat -q
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

# The versions every test in tests/compat was last run and passing against
# (the installed ones, and the newest releases setup.cfg allows, when these
# tests were written). Widen a range after checking a new release.
CHECKED = {
    "twisted": "twisted 26.10",
    "autobahn": "autobahn 26.11",
    "txredisapi": "txredisapi 1.6",
    "prometheus-client": "prometheus-client 0.26",
}


def installed(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - the library itself is missing
        return "(not installed)"


def changed(dist: str, what: str, ours: str) -> str:
    """The message of a failed compatibility check."""
    return f"{dist} {installed(dist)} changed {what} (checked against {CHECKED[dist]}): revisit {ours}"


@contextlib.contextmanager
def relied_on(dist: str, what: str, ours: str) -> Iterator[None]:
    """
    Any failure inside (an assertion, a missing attribute, a changed
    signature raising TypeError...) becomes one AssertionError whose message
    starts with ``changed(dist, what, ours)``; the original follows it.
    """
    try:
        yield
    except AssertionError as e:
        detail = str(e).strip()
        raise AssertionError(changed(dist, what, ours) + (f" [{detail}]" if detail else "")) from e
    except Exception as e:
        raise AssertionError(changed(dist, what, ours) + f" [{type(e).__name__}: {e}]") from e
