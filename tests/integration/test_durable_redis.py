"""
delivery = at_least_once with [queue] backend = redis (docs/durable-delivery.md): two
gateway nodes share one real redis-server; every queued entry reaches the
upstream through exactly one of them, also when one is killed with entries
still queued.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from websockets.sync.client import connect

from support.waiting import wait_for
from support.redis_server import RedisServer
from support.durable_backend import Backend, ini


def node_ini(backend: Backend, redis: RedisServer, node: str) -> str:
    return ini(backend.node, extra=f"""
        [redis]
        url = {redis.url}
        prefix = dq
        """).replace("[queue]\n        path = q.sqlite", f"[queue]\n        backend = redis").replace(
        "[gateway]\n", f"[gateway]\n        node_id = {node}\n")


def _depth(redis: RedisServer) -> int:
    keys = redis.command(b"KEYS", b"dq:q:s:*")
    return sum(int(redis.command(b"XLEN", k)) for k in keys or [])


def _send_and_leave(gw: Any, tag: str, n: int) -> None:
    with connect(gw.url + f"/{tag}", compression=None, open_timeout=10, max_queue=None) as ws:
        for i in range(n):
            ws.send(f"{tag}:{i}")


def test_two_nodes_each_entry_delivered_by_exactly_one(start_gateway: Any, redis_server: RedisServer) -> None:
    backend = Backend()  # down
    a = start_gateway(node_ini(backend, redis_server, "gw-a"))
    b = start_gateway(node_ini(backend, redis_server, "gw-b"))
    for i in range(6):
        _send_and_leave(a if i % 2 else b, f"c{i}", 100)
    assert wait_for(lambda: _depth(redis_server) == 600, timeout=10), _depth(redis_server)
    backend.start()
    assert wait_for(lambda: _depth(redis_server) == 0, timeout=30), _depth(redis_server)
    counts = Counter(m for leg in backend.legs for m in leg.messages)
    assert set(counts) == {f"c{i}:{k}" for i in range(6) for k in range(100)}
    assert set(counts.values()) == {1}, [m for m, c in counts.items() if c > 1][:5]
    # each node replayed only its own clients
    assert "replayed" in a.log() and "replayed" in b.log()


def test_a_killed_node_s_entries_are_delivered_once_by_the_survivor(
    start_gateway: Any, redis_server: RedisServer
) -> None:
    backend = Backend()
    a = start_gateway(node_ini(backend, redis_server, "gw-a"))
    b = start_gateway(node_ini(backend, redis_server, "gw-b"))
    _send_and_leave(a, "dead", 200)
    _send_and_leave(b, "alive", 50)
    assert wait_for(lambda: _depth(redis_server) == 250, timeout=10)
    a.proc.kill()
    a.proc.wait(10)
    backend.start()
    assert wait_for(lambda: _depth(redis_server) == 0, timeout=30), _depth(redis_server)
    counts = Counter(m for leg in backend.legs for m in leg.messages)
    assert set(counts) == {f"dead:{k}" for k in range(200)} | {f"alive:{k}" for k in range(50)}
    assert set(counts.values()) == {1}
    dead = [leg for leg in backend.legs if leg.messages and str(leg.messages[0]).startswith("dead:")]
    assert all(leg.headers["x-wsgateway-replay"] == "1" for leg in dead)
    # in order, as the client sent them
    assert [m for leg in dead for m in leg.messages] == [f"dead:{k}" for k in range(200)]
