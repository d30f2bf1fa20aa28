# -*- test-case-name: tests.integration.test_daemon -*-
"""
twistd entry point: ``twistd -n wsgateway --config etc/development.ini``
(``make run``); in production the default, /etc/wsgateway/wsgateway.ini.

The only module that touches the global reactor.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.python import usage

from wsgateway.config import loader as _config


class Options(usage.Options):
    optParameters = [["config", "c", "/etc/wsgateway/wsgateway.ini", "INI config file"]]

    loaded: _config.GatewayConfig

    def opt_version(self) -> None:
        """Print the wsgateway version (and the Python, Twisted and Autobahn it runs on), then exit."""
        # Overrides usage.Options' own, which prints Twisted's: after the
        # subcommand (`twistd wsgateway --version`) the version is ours.
        from wsgateway.version import describe

        print(describe())
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.loaded = _config.load(self["config"])
        except _config.ConfigError as e:
            # twistd turns a UsageError into a usage text and may still exit
            # 0; a daemon with a bad config must fail loudly and non-zero.
            for line in e.errors:
                print(line, file=sys.stderr)
            print(f"wsgateway: {len(e.errors)} error(s) in {self['config']}; nothing started", file=sys.stderr)
            raise SystemExit(1)
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            from wsgateway.ops.logs import configure, observer_factory

            log = self.loaded.log
            parent["logger"] = configure(observer_factory(
                level=log.level,
                fmt=log.format,
                file=log.file,
                node_id=self.loaded.gateway.node_id,
                twistd_logfile=parent.get("logfile") or None,
                daemon=not parent.get("nodaemon"),
            ))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # absolute: SIGHUP re-reads it, and twistd may have changed directory by then (--rundir)
    path = os.path.abspath(options["config"])
    if options.loaded.gateway.workers > 1:
        # a parent binding the sockets for N worker processes (wsgateway.workers.parent)
        from wsgateway.workers.parent import WorkerParent

        return WorkerParent(options.loaded, reactor, config_path=path)

    from wsgateway._compat import autobahn
    from wsgateway.service import GatewayService

    # process-wide patches, applied where the process and its reactor are set up, never on import
    autobahn.install()
    return GatewayService(options.loaded, reactor, config_path=path)
