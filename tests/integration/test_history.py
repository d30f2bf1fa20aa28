"""
Channel history and recovery (docs/protocol.md#channel-history-and-recovery)
through real gateway processes: two nodes on one real redis-server, and one
node with the in-process broker. A client that reconnects with
``?since=&epoch=`` gets what it missed, in order, once, on either node; or
``recovered: false`` when history cannot say.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from support.channelnodes import admin, node_ini
from support.gateway import free_port
from support.metrics_text import get as metric
from support.metrics_text import scrape
from support.redis_server import RedisServer
from support.waiting import wait_for
from support.wsclient import Listener

JSON = ["wsgateway.json"]
HISTORY = """
        [route:feed]
        path = /feed/{name}
        mode = broadcast
        channel = feed:{name}
        auth = none
        history_size = 100
        history_ttl = 300
        slow_consumer = close
"""


def history_ini(node_id: str, admin_port: int, echo: str, redis_url: str = "") -> str:
    return node_ini(node_id, admin_port, echo, redis_url) + HISTORY


@pytest.fixture
def two_nodes(redis_server: RedisServer, start_gateway: Any, make_upstream: Any) -> tuple[Any, int, Any, int]:
    echo = make_upstream().node
    a_admin, b_admin = free_port(), free_port()
    a = start_gateway(history_ini("gw-a", a_admin, echo, redis_server.url))
    b = start_gateway(history_ini("gw-b", b_admin, echo, redis_server.url))
    for port in (a_admin, b_admin):
        assert wait_for(lambda p=port: admin(p, "GET", "/readyz")[1].get("status") == "ready", 10)
    return a, a_admin, b, b_admin


def publish(admin_port: int, channel: str, message: str) -> dict[str, Any]:
    status, body = admin(admin_port, "POST", "/admin/publish", {"channel": channel, "message": message})
    assert status == 200, body
    return body


def envelopes(ws: ClientConnection, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    return [json.loads(ws.recv(timeout=timeout)) for _ in range(n)]


def subscribed(admin_port: int, channel: str, count: int) -> bool:
    return len(admin(admin_port, "GET", f"/admin/channels/{channel}")[1].get("connections", ())) >= count


def test_a_client_reconnecting_to_the_other_node_gets_exactly_what_it_missed_then_live(
        two_nodes: tuple[Any, int, Any, int]) -> None:
    a, a_admin, b, b_admin = two_nodes
    with connect(f"{a.url}/feed/news", subprotocols=JSON, open_timeout=10) as ws:
        assert ws.subprotocol == "wsgateway.json"
        assert wait_for(lambda: subscribed(a_admin, "feed:news", 1), 10)
        first = publish(b_admin, "feed:news", "before")
        got = envelopes(ws, 1)[0]
        assert got == {"channel": "feed:news", "offset": first["offset"], "epoch": first["epoch"], "data": "before"}
    since, epoch = got["offset"], got["epoch"]
    # 50 while it is away, through node 2: 25 from a client of node 2, 25 from the admin API
    with connect(f"{b.url}/feed/news", open_timeout=10) as publisher:
        assert wait_for(lambda: subscribed(b_admin, "feed:news", 1), 10)
        for i in range(25):
            publisher.send(f"m{i}")
        assert wait_for(lambda: admin(b_admin, "GET", f"/admin/history?channel=feed:news&since={since}")[1]
                        .get("offset", 0) == since + 25, 10)
    for i in range(25, 50):
        publish(b_admin, "feed:news", f"m{i}")
    with connect(f"{b.url}/feed/news?since={since}&epoch={epoch}", subprotocols=JSON, open_timeout=10) as ws:
        head = json.loads(ws.recv(timeout=10))
        assert head == {"recovered": True, "channel": "feed:news", "offset": since + 50, "epoch": epoch}
        missed = envelopes(ws, 50)
        assert [m["data"] for m in missed] == [f"m{i}" for i in range(50)]
        assert [m["offset"] for m in missed] == list(range(since + 1, since + 51))
        live = publish(a_admin, "feed:news", "live")
        assert envelopes(ws, 1) == [{"channel": "feed:news", "offset": live["offset"], "epoch": epoch, "data": "live"}]
        assert live["offset"] == since + 51
    assert metric(scrape(b_admin), "wsgateway_history_recoveries_total", route="feed", result="recovered") == 1


def test_history_trimmed_past_the_offset_says_recovered_false_then_goes_live(
        two_nodes: tuple[Any, int, Any, int]) -> None:
    a, a_admin, b, b_admin = two_nodes
    first = publish(a_admin, "feed:busy", "0")
    for i in range(1, 120):  # history_size = 100: the first 20 are gone
        publish(a_admin, "feed:busy", str(i))
    with connect(f"{b.url}/feed/busy?since={first['offset']}&epoch={first['epoch']}", subprotocols=JSON,
                 open_timeout=10) as ws:
        head = json.loads(ws.recv(timeout=10))
        assert head == {"recovered": False, "channel": "feed:busy", "offset": 120, "epoch": first["epoch"]}
        publish(a_admin, "feed:busy", "after")
        assert envelopes(ws, 1)[0]["data"] == "after"  # nothing from history came first
    status, kept = admin(b_admin, "GET", "/admin/history?channel=feed:busy&since=0")
    assert status == 200
    assert [m["offset"] for m in kept["messages"]] == list(range(21, 122))[-100:]
    assert kept["epoch"] == first["epoch"]
    assert metric(scrape(b_admin), "wsgateway_history_recoveries_total", route="feed", result="gap") == 1


def test_redis_restarted_empty_gives_a_new_epoch_and_recovered_false(
        redis_server: RedisServer, two_nodes: tuple[Any, int, Any, int]) -> None:
    a, a_admin, b, b_admin = two_nodes
    old = publish(a_admin, "feed:reset", "old")
    redis_server.kill()
    redis_server.start()
    assert wait_for(lambda: admin(a_admin, "GET", "/readyz")[1].get("status") == "ready"
                    and admin(b_admin, "GET", "/readyz")[1].get("status") == "ready", 20)
    new = publish(a_admin, "feed:reset", "new")
    assert new["epoch"] != old["epoch"] and new["offset"] == 1
    with connect(f"{b.url}/feed/reset?since={old['offset']}&epoch={old['epoch']}", subprotocols=JSON,
                 open_timeout=10) as ws:
        head = json.loads(ws.recv(timeout=10))
        assert head == {"recovered": False, "channel": "feed:reset", "offset": 1, "epoch": new["epoch"]}


def test_messages_published_during_recoveries_arrive_once_in_order_at_the_seam(
        two_nodes: tuple[Any, int, Any, int]) -> None:
    """
    A publisher on node 1 never stops while clients recover on node 2 again
    and again from older and older offsets: each sees every offset after
    its own exactly once, increasing, across history and live.
    """
    a, a_admin, b, b_admin = two_nodes
    first = publish(a_admin, "feed:seam", "start")
    epoch = first["epoch"]
    stop = threading.Event()
    sent: list[int] = []

    def keep_publishing() -> None:
        with connect(f"{a.url}/feed/seam", open_timeout=10) as ws:
            deadline = time.monotonic() + 20
            for i in range(100000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                ws.send(f"p{i}")
                sent.append(i)
                time.sleep(0.002)

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        for round_ in range(8):
            assert wait_for(lambda r=round_: len(sent) > 20 * (r + 1), 10)
            kept = admin(b_admin, "GET", "/admin/history?channel=feed:seam&since=0")[1]
            since = max(kept["offset"] - 40, first["offset"] - 1)
            with connect(f"{b.url}/feed/seam?since={since}&epoch={epoch}", subprotocols=JSON,
                         open_timeout=10) as ws:
                head = json.loads(ws.recv(timeout=10))
                assert head["recovered"] is True, head
                offsets = [m["offset"] for m in envelopes(ws, head["offset"] - since + 30)]
            assert offsets == list(range(since + 1, since + 1 + len(offsets))), (since, head, offsets)
    finally:
        stop.set()
        publisher.join(10)


def test_one_node_in_process_broker_recovers_and_raw_clients_get_raw_messages(
        start_gateway: Any, make_upstream: Any) -> None:
    admin_port = free_port()
    gw = start_gateway(history_ini("gw-one", admin_port, make_upstream().node))
    assert wait_for(lambda: admin(admin_port, "GET", "/readyz")[1].get("status") == "ready", 10)
    raw = Listener(f"{gw.url}/feed/solo")  # no subprotocol: raw messages, as before
    with connect(f"{gw.url}/feed/solo", subprotocols=JSON, open_timeout=10) as ws:
        assert wait_for(lambda: subscribed(admin_port, "feed:solo", 2), 10)
        publish(admin_port, "feed:solo", "one")
        got = envelopes(ws, 1)[0]
    for i in range(5):
        publish(admin_port, "feed:solo", f"missed{i}")
    status, body = admin(admin_port, "POST", "/admin/publish",
                         {"channel": "feed:solo", "message": "AAEC", "binary": True})
    assert status == 200 and body["offset"] == got["offset"] + 6
    with connect(f"{gw.url}/feed/solo?since={got['offset']}&epoch={got['epoch']}", subprotocols=JSON,
                 open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["recovered"] is True
        missed = envelopes(ws, 6)
        assert [m.get("data") for m in missed[:5]] == [f"missed{i}" for i in range(5)]
        assert missed[5]["data_b64"] == "AAEC" and "data" not in missed[5]
    assert wait_for(lambda: len(raw.got) == 7, 10)
    assert raw.got == ["one", *[f"missed{i}" for i in range(5)], b"\x00\x01\x02"]
    # a channel without history: no offset in the publish answer, 404 for its history
    assert "offset" not in publish(admin_port, "room:plain", "x")
    assert admin(admin_port, "GET", "/admin/history?channel=room:plain")[0] == 404


@pytest.mark.parametrize("query", ["since=-1", "since=abc", "since=1e3", "since=99999999999999999999"],
                         ids=["negative", "word", "float", "huge"])
def test_a_since_that_is_no_offset_is_refused_400(start_gateway: Any, make_upstream: Any, query: str) -> None:
    gw = start_gateway(history_ini("gw-bad", free_port(), make_upstream().node))
    with pytest.raises(InvalidStatus) as info:
        connect(f"{gw.url}/feed/x?{query}", open_timeout=10)
    assert info.value.response.status_code == 400


def test_a_reload_turns_history_on_for_the_next_message(start_gateway: Any, make_upstream: Any) -> None:
    admin_port = free_port()
    echo = make_upstream().node
    gw = start_gateway(node_ini("gw-r", admin_port, echo) + HISTORY.replace("history_size = 100", "history_size = 0"))
    assert "offset" not in publish(admin_port, "feed:r", "before")
    body = node_ini("gw-r", admin_port, echo) + HISTORY
    tmp = gw.ini_path.with_suffix(".new")
    tmp.write_text(textwrap.dedent(body).replace("{port}", gw.ini_port))
    os.replace(tmp, gw.ini_path)
    before = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded " in gw.log()[before:], 10), gw.log()[before:]
    assert publish(admin_port, "feed:r", "after")["offset"] == 1
    kept = admin(admin_port, "GET", "/admin/history?channel=feed:r")[1]
    assert [m["data"] for m in kept["messages"]] == ["after"]


def test_with_workers_the_parent_answers_publish_and_history_and_any_worker_recovers(
        redis_server: RedisServer, start_gateway: Any, make_upstream: Any) -> None:
    admin_port = free_port()
    body = node_ini("gw-w", admin_port, make_upstream().node, redis_server.url,
                    gateway="workers = 2") + HISTORY
    gw = start_gateway(body)
    assert wait_for(lambda: admin(admin_port, "GET", "/readyz")[1].get("status") == "ready", 20)
    first = publish(admin_port, "feed:w", "m0")
    for i in range(1, 10):
        assert publish(admin_port, "feed:w", f"m{i}")["offset"] == first["offset"] + i
    kept = admin(admin_port, "GET", "/admin/history?channel=feed:w&since=5")[1]
    assert [m["data"] for m in kept["messages"]] == [f"m{i}" for i in range(5, 10)]
    for _ in range(6):  # the kernel hands each connection to either worker: every one recovers the same
        with connect(f"{gw.url}/feed/w?since={first['offset'] + 7}&epoch={first['epoch']}", subprotocols=JSON,
                     open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["recovered"] is True
            assert [m["data"] for m in envelopes(ws, 2)] == ["m8", "m9"]
