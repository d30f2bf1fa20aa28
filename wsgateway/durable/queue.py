# -*- test-case-name: tests.integration.test_durable -*-
"""
Opening the durable queue of a gateway with ``at_least_once`` routes: the
configured store (SQLite or Redis) under a DeliveryService.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from wsgateway.config.loader import GatewayConfig
from wsgateway.durable.delivery import DeliveryService
from wsgateway.durable.entries import Entry


def make_queue(
    config: GatewayConfig,
    reactor: Any,
    metrics: Any,
    *,
    replay: Callable[[str, list[Entry]], Deferred[bool]] | None = None,
) -> DeliveryService | None:
    """
    The queue store and its deliverer (replaying with ``replay``), if any route is at_least_once. Routes
    that become at_least_once by a reload get one only after a restart.
    """
    if not any(r.delivery == "at_least_once" for r in config.routes):
        return None
    if config.queue.backend == "redis" and config.redis is not None:
        from wsgateway.durable.redis import RedisQueueStore

        store: Any = RedisQueueStore.from_config(config.queue, config.redis, node_id=config.gateway.node_id,
                                                 reactor=reactor)
    else:
        # sqlite3 only in gateways that queue
        from wsgateway.durable.sqlite import SQLiteQueueStore
        from wsgateway.durable.sqlite_file import adopt_orphans

        if config.gateway.workers == 1:
            # files a run with workers > 1 left (a worker process's own queue is its parent's to sort out)
            adopt_orphans(config.queue.path, 1)
        store = SQLiteQueueStore.from_config(config.queue, reactor=reactor)
    return DeliveryService(store, clock=reactor, metrics=metrics, replay=replay)
