# -*- test-case-name: tests.unit.core.test_version -*-
"""
The wsgateway version and the versions it runs on: what ``--version``
prints (twistd's plugin and ``wsgateway-check``), the first log line and
``wsgateway_build_info`` say. The version is written once, in setup.cfg
(``[metadata] version``), and read here from the installed package's
metadata, so no second copy can drift from it.
"""

from __future__ import annotations

import platform
from importlib import metadata

import autobahn
import twisted

__all__ = ["UNKNOWN", "build_info", "describe", "version"]

# A source tree imported without being installed (no metadata): still runs,
# and says so instead of guessing a number.
UNKNOWN = "unknown"


def version() -> str:
    """The installed wsgateway's version, e.g. ``0.1.0``."""
    try:
        return metadata.version("wsgateway")
    except metadata.PackageNotFoundError:
        return UNKNOWN


def build_info() -> dict[str, str]:
    """The labels of ``wsgateway_build_info``: version, python, twisted, autobahn."""
    return {
        "version": version(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "autobahn": autobahn.__version__,
    }


def describe() -> str:
    """``wsgateway 1.2.3 (Python X, Twisted Y, Autobahn Z)``: the ``--version`` line."""
    info = build_info()
    return f"wsgateway {info['version']} (Python {info['python']}, Twisted {info['twisted']}, Autobahn {info['autobahn']})"
