"""Benchmark peer: Twisted's blind TCP relay (twisted.protocols.portforward).

It copies bytes both ways without parsing a single WebSocket frame, so it is
the ceiling of any proxy written on Twisted: what the gateway costs beyond
the reactor itself is the distance to this peer.

    .venv/bin/python bench/peers/twisted_relay.py --port 9301 --upstream-port 9001

Like `twistd -n portforward` (what earlier bench/RESULTS.md entries ran), it
logs to stdout through Twisted's log system: each relayed connection logs its
client factory starting and stopping, as it does under twistd.
Loopback only: it listens on 127.0.0.1 and connects to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.portforward import ProxyFactory

LOOPBACK = "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9301, help="port to listen on (127.0.0.1)")
    parser.add_argument("--upstream-port", type=int, default=9001, help="port to relay to (127.0.0.1)")
    parser.add_argument("--quiet", action="store_true", help="do not log (faster than twistd would be)")
    args = parser.parse_args(argv)
    if not args.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    # default backlog (50), like twistd's tcp: endpoint
    reactor.listenTCP(args.port, ProxyFactory(LOOPBACK, args.upstream_port), interface=LOOPBACK)
    reactor.run()


if __name__ == "__main__":
    main()
