# -*- test-case-name: tests.unit.config.test_config_files -*-
"""
Reading a file the config names (docs/configuration.md): a key, a certificate, a
JWKS or API-key file, a C{file:} value. At start, in C{wsgateway-check} and
on every SIGHUP, through this one function, so a hostile or mistaken path
cannot hang the daemon (a named pipe), exhaust its memory (C{/dev/zero}) or
hand a secret to every local user (a world-readable key).

Pure: nothing of Twisted, so L{wsgateway.auth.keys} and L{wsgateway.tls}
use it as the config package does.
"""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_FILE", "FileRefused", "read_bounded"]

MAX_FILE = 1024 * 1024  # no key, certificate chain, JWKS or secret the gateway reads is anywhere near this


class FileRefused(ValueError):
    """The file is not one the gateway reads; the message names it and, where one exists, the fix."""


def read_bounded(path: str, *, private: bool = False, limit: int = MAX_FILE) -> bytes:
    """
    The bytes of the regular file C{path}, at most C{limit} of them.
    C{private}: a private key or a secret, refused when its group or other
    users may read it (or write it).

    @raise FileRefused: not a regular file, too big, or too open.
    @raise OSError: it cannot be opened or read (missing, no permission).
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer that may never come
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)  # of what was opened, so a path swapped after a check cannot slip through
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path} is not a regular file")
        if private and st.st_mode & 0o077:
            raise FileRefused(f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                              f"it holds a secret: chmod 600 {path}")
        if st.st_size > limit:
            raise FileRefused(f"{path} is larger than {_shown(limit)} ({st.st_size} bytes)")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        # bounded even if the file grows while it is read
        while got <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise FileRefused(f"{path} is larger than {_shown(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _shown(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"
