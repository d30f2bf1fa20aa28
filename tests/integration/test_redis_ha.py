"""
Redis high availability and sharding (docs/configuration.md#redis) with
real processes on loopback: gateways on three Redis shards (placement,
agreement between nodes, one shard down), and on a Sentinel-managed master
and replica (failover under broadcast and durable load).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support.channelnodes import admin, node_ini
from support.durable_backend import Backend
from support.durable_backend import ini as durable_ini
from support.gateway import free_port
from support.metrics_text import get as metric
from support.metrics_text import scrape
from support.redis_sentinel import SentinelCluster
from support.redis_server import RedisServer, running_redis
from support.waiting import wait_for
from support.wsclient import Listener
from wsgateway.channels.shards import shard_of

FEED = """
        [route:feed]
        path = /feed/{name}
        mode = broadcast
        channel = feed:{name}
        auth = none
        history_size = 10
"""


def sharded_ini(node_id: str, admin_port: int, echo: str, urls: list[str]) -> str:
    body = node_ini(node_id, admin_port, echo) + FEED
    return body.replace("[log]", "[redis]\n        prefix = t\n        shards = " + " ".join(urls) + "\n\n        [log]")


@pytest.fixture
def three_shards(tmp_path: Path) -> Iterator[list[RedisServer]]:
    with running_redis(tmp_path / "r0") as a, running_redis(tmp_path / "r1") as b, \
            running_redis(tmp_path / "r2") as c:
        yield [a, b, c]


def name(server: RedisServer) -> str:
    return f"127.0.0.1:{server.port}/0"


def publish(admin_port: int, channel: str, message: str) -> tuple[int, Any]:
    return admin(admin_port, "POST", "/admin/publish", {"channel": channel, "message": message})


def ready(admin_port: int, status: str = "ready") -> bool:
    return bool(admin(admin_port, "GET", "/readyz")[1].get("status") == status)


def test_channels_spread_over_three_shards_and_both_nodes_agree(
        three_shards: list[RedisServer], start_gateway: Any, make_upstream: Any) -> None:
    echo = make_upstream().node
    urls = [s.url for s in three_shards]
    a_admin, b_admin = free_port(), free_port()
    a = start_gateway(sharded_ini("gw-a", a_admin, echo, urls))
    start_gateway(sharded_ini("gw-b", b_admin, echo, urls))
    assert wait_for(lambda: ready(a_admin) and ready(b_admin), 15)
    assert admin(a_admin, "GET", "/readyz")[1]["redis"] == {name(s): "up" for s in three_shards}
    for i in range(300):
        assert publish(a_admin, f"feed:{i}", "x")[0] == 200
    held = [{k.decode() for k in s.command("KEYS", "t:hm:*")} for s in three_shards]  # type: ignore[union-attr]
    assert sum(len(h) for h in held) == 300 and set.union(*held) == {f"t:hm:feed:{i}" for i in range(300)}
    assert max(len(h) for h in held) <= 150, [len(h) for h in held]
    for k, h in enumerate(held):  # where the test's own hash says, on the node that published
        assert all(shard_of(key[len("t:hm:"):], 3) == k for key in h)
    # a subscriber on node A gets what node B publishes, whichever shard its channel is on
    listeners = {c: Listener(f"{a.url}/feed/{c}") for c in ("n0", "n1", "n2", "n3", "n4", "n5")}
    assert {shard_of(f"feed:{c}", 3) for c in listeners} == {0, 1, 2}
    assert wait_for(lambda: all(len(admin(b_admin, "GET", f"/admin/channels/feed:{c}")[1]["connections"]) == 1
                                for c in listeners), 10)
    for c in listeners:
        assert publish(b_admin, f"feed:{c}", f"to {c}")[0] == 200
    assert wait_for(lambda: all(ls.got == [f"to {c}"] for c, ls in listeners.items()), 10), \
        {c: ls.got for c, ls in listeners.items()}


def test_a_shard_down_affects_only_its_own_channels(
        three_shards: list[RedisServer], start_gateway: Any, make_upstream: Any) -> None:
    echo = make_upstream().node
    admin_port = free_port()
    gw = start_gateway(sharded_ini("gw-s", admin_port, echo, [s.url for s in three_shards]))
    assert wait_for(lambda: ready(admin_port), 15)
    by_shard: dict[int, str] = {}
    for i in range(100):
        by_shard.setdefault(shard_of(f"room:c{i}", 3), f"c{i}")
    dead = three_shards[1]
    dead.kill()
    assert wait_for(lambda: ready(admin_port, "degraded"), 15)
    body = admin(admin_port, "GET", "/readyz")[1]
    assert body["redis"] == {name(three_shards[0]): "up", name(dead): "down", name(three_shards[2]): "up"}
    page = scrape(admin_port)
    assert metric(page, "wsgateway_redis_up", shard=name(dead)) == 0
    assert metric(page, "wsgateway_redis_up", shard=name(three_shards[0])) == 1
    for k, room in by_shard.items():
        if k == 1:
            with pytest.raises(InvalidStatus) as info:
                connect(f"{gw.url}/room/{room}", open_timeout=10)
            assert info.value.response.status_code == 503
            assert publish(admin_port, f"room:{room}", "x")[0] == 503
        else:
            listener = Listener(f"{gw.url}/room/{room}")
            assert wait_for(lambda r=room: len(admin(admin_port, "GET", f"/admin/channels/room:{r}")[1]
                                               .get("connections", [])) == 1, 10)
            assert publish(admin_port, f"room:{room}", "still here")[0] == 200
            assert wait_for(lambda ls=listener: ls.got == ["still here"], 10)
    with connect(f"{gw.url}/proxy/x", open_timeout=10) as ws:  # proxying never depends on Redis
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
    dead.start()
    assert wait_for(lambda: ready(admin_port), 20)
    assert json.loads(json.dumps(admin(admin_port, "GET", "/readyz")[1]["redis"]))[name(dead)] == "up"


# -- Sentinel ---------------------------------------------------------------------------------------


def sentinel_ini(node_id: str, admin_port: int, echo: str, cluster: SentinelCluster, extra: str = "") -> str:
    body = node_ini(node_id, admin_port, echo) + FEED
    redis = (f"[redis]\n        prefix = t\n        sentinels = {' '.join(cluster.sentinels)}\n"
             f"        sentinel_master = {cluster.master_name}\n{extra}\n\n        [log]")
    return body.replace("[log]", redis)


def test_broadcast_follows_a_sentinel_failover_between_two_nodes(
        sentinel_cluster: SentinelCluster, start_gateway: Any, make_upstream: Any) -> None:
    echo = make_upstream().node
    a_admin, b_admin = free_port(), free_port()
    a = start_gateway(sentinel_ini("gw-a", a_admin, echo, sentinel_cluster))
    start_gateway(sentinel_ini("gw-b", b_admin, echo, sentinel_cluster))
    assert wait_for(lambda: ready(a_admin) and ready(b_admin), 15)
    listener = Listener(f"{a.url}/room/ha")
    assert wait_for(lambda: len(admin(b_admin, "GET", "/admin/channels/room:ha")[1]["connections"]) == 1, 10)
    assert publish(b_admin, "room:ha", "before")[0] == 200
    assert wait_for(lambda: listener.got == ["before"], 10)

    killed_at = time.monotonic()
    old = sentinel_cluster.kill_master()
    assert wait_for(lambda: ready(a_admin, "degraded") or ready(b_admin, "degraded"), 10)
    with connect(f"{a.url}/proxy/x", open_timeout=10) as ws:  # proxying never stops
        ws.send("during")
        assert ws.recv(timeout=10) == "during"
    new = sentinel_cluster.wait_for_failover(old)
    promoted_at = time.monotonic()
    assert wait_for(lambda: ready(a_admin) and ready(b_admin), 15)
    back_at = time.monotonic()
    # both nodes talk to the promoted replica now, and counted one failover each
    for port in (a_admin, b_admin):
        assert metric(scrape(port), "wsgateway_redis_failovers_total", shard=sentinel_cluster.master_name) == 1
        assert metric(scrape(port), "wsgateway_redis_up", shard=sentinel_cluster.master_name) == 1
    assert back_at - promoted_at <= 5.0, (killed_at, promoted_at, back_at)
    sent = [f"after {i}" for i in range(20)]
    for message in sent:
        assert publish(b_admin, "room:ha", message)[0] == 200
    assert wait_for(lambda: len(listener.got) >= 21, 10)
    assert listener.got == ["before", *sent]  # once each, in order
    assert f"127.0.0.1:{new}" in a.log()


def test_durable_appends_wait_for_a_replica_and_survive_a_failover(
        sentinel_cluster: SentinelCluster, start_gateway: Any) -> None:
    backend = Backend()  # down: everything stays queued in Redis
    cluster = sentinel_cluster
    body = durable_ini(backend.node, extra=f"""
        [redis]
        prefix = dq
        sentinels = {' '.join(cluster.sentinels)}
        sentinel_master = {cluster.master_name}
        min_replicas_ack = 1
        """).replace("[queue]\n        path = q.sqlite", "[queue]\n        backend = redis")
    gw = start_gateway(body)
    assert wait_for(lambda: "queue: redis up" in gw.log(), 15)
    confirmed: list[str] = []
    with connect(gw.url + "/ha", compression=None, open_timeout=10) as ws:
        for batch in range(10):
            messages = [f"m{batch}-{i}" for i in range(20)]
            for m in messages:
                ws.send(m)
            assert ws.ping().wait(10), "no pong: the appends were not confirmed"
            confirmed += messages  # the pong comes only after they are stored (and replicated)
        old = cluster.kill_master()  # at once after the last confirmation
    cluster.wait_for_failover(old)
    assert wait_for(lambda: "redis failover followed" in gw.log(), 15), gw.log()[-2000:]
    # the promoted master has no replica now (the old master is down): WAIT cannot be
    # satisfied, so nothing more is confirmed, and the client is told so
    with connect(gw.url + "/ha2", compression=None, open_timeout=10) as ws:
        ws.send("unconfirmable")
        pong = ws.ping()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=15)
        assert not pong.is_set()
    assert info.value.rcvd is not None and (info.value.rcvd.code, info.value.rcvd.reason) == (1011,
                                                                                           "queue unavailable")
    backend.start()
    assert wait_for(lambda: set(confirmed) <= {m for leg in backend.legs for m in leg.messages}, 30)


@pytest.mark.parametrize("sentinel_cluster", [{"password": "data-pw-1", "sentinel_password": "sentinel-pw-2"}],
                         indirect=True, ids=["passwords"])
def test_sentinel_and_master_passwords(sentinel_cluster: SentinelCluster, start_gateway: Any,
                                       make_upstream: Any) -> None:
    """AUTH to the sentinels with sentinel_password and to the master with password; never logged."""
    echo = make_upstream().node
    good, bad = free_port(), free_port()
    gw = start_gateway(sentinel_ini("gw-p", good, echo, sentinel_cluster,
                                    "        password = data-pw-1\n        sentinel_password = sentinel-pw-2"))
    assert wait_for(lambda: ready(good), 15)
    assert publish(good, "room:pw", "x")[0] == 200
    wrong = start_gateway(sentinel_ini("gw-q", bad, echo, sentinel_cluster,
                                       "        password = not-it\n        sentinel_password = sentinel-pw-2"))
    assert wait_for(lambda: "WRONGPASS" in wrong.log() or "invalid password" in wrong.log(), 15), wrong.log()[-2000:]
    assert ready(bad, "degraded")
    for log in (gw.log(), wrong.log()):
        assert "data-pw-1" not in log and "sentinel-pw-2" not in log and "not-it" not in log
