"""
Ids the gateway makes on every handshake: connection ids, request ids,
W3C trace and span ids, the relay's ping payloads.

They must be unique, not secret: nothing is authorised by knowing one. A
PRNG seeded once from the OS costs a fraction of a getrandom() system call
per id, and a handshake made five of them (measured: about 4 % of the CPU
of bench scenario e). Worker processes are started with exec, so each
seeds its own.
"""

from __future__ import annotations

import os
import random

_rng = random.Random(os.urandom(32))
_bits = _rng.getrandbits


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as ``2 * nbytes`` lower-case hex digits."""
    return f"{_bits(nbytes * 8):0{nbytes * 2}x}"


def random_bytes(nbytes: int) -> bytes:
    return _bits(nbytes * 8).to_bytes(nbytes, "big")
