# -*- test-case-name: tests.unit.config.test_config -*-
"""
C{wsgateway-check CONFIG} (also C{python -m wsgateway.config CONFIG}): validate an INI file, start nothing.

The shipped systemd unit runs it before every start and reload.
"""

from __future__ import annotations

import sys

from wsgateway.config.loader import ConfigError, load

__all__ = ["main"]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def main(argv: list[str] | None = None) -> int:
    """C{wsgateway-check CONFIG}: 0 and a summary when valid, else 1 and one problem per line on stderr."""
    args = sys.argv[1:] if argv is None else list(argv)
    usage = ("usage: wsgateway-check CONFIG\n\nValidate a wsgateway INI file without starting anything.\n"
             "wsgateway-check --version prints the wsgateway version.")
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if args == ["--version"]:
        from wsgateway.version import describe

        print(describe())
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(usage.splitlines()[0], file=sys.stderr)
        return 1
    try:
        config = load(args[0])
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{args[0]}: OK, {_plural(len(config.routes), 'route')}, {_plural(len(config.upstreams), 'upstream')}")
    return 0
