"""
Broadcast routes through real gateway processes: two nodes sharing a real
redis-server, the admin API's publish and presence, Redis dying mid-run,
and a slow subscriber that must not hold back the room.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from support import rawws
from support.gateway import free_port
from support.waiting import wait_for
from support.wsclient import Listener
from support.redis_server import RedisServer
from support.channelnodes import SECRET, admin, node_ini

@pytest.fixture
def two_nodes(redis_server: RedisServer, start_gateway: Any, make_upstream: Any) -> tuple[Any, int, Any, int]:
    echo = make_upstream().node
    a_admin, b_admin = free_port(), free_port()
    a = start_gateway(node_ini("gw-a", a_admin, echo, redis_server.url))
    b = start_gateway(node_ini("gw-b", b_admin, echo, redis_server.url))
    for port in (a_admin, b_admin):
        assert wait_for(lambda p=port: admin(p, "GET", "/readyz")[1].get("status") == "ready", 10)
    return a, a_admin, b, b_admin


def test_a_room_across_two_nodes_gets_every_message_once_in_order(two_nodes: tuple[Any, int, Any, int]) -> None:
    a, a_admin, b, _b_admin = two_nodes
    clients = [Listener(f"{gw.url}/room/lobby") for gw in (a, b) for _ in range(20)]
    # presence: all 40 are on the channel, across both nodes
    assert wait_for(lambda: len(admin(a_admin, "GET", "/admin/channels/room:lobby")[1]["connections"]) == 40, 10)
    nodes = {e["node"] for e in admin(a_admin, "GET", "/admin/channels/room:lobby")[1]["connections"]}
    assert nodes == {"gw-a", "gw-b"}
    for n in range(200):
        sender = (n * 7) % 40  # varied senders on both nodes
        clients[sender].ws.send(f"{sender}:{n}")
    sent_by = {i: [f"{i}:{n}" for n in range(200) if (n * 7) % 40 == i] for i in range(40)}
    expected = {i: 200 - len(sent_by[i]) for i in range(40)}
    assert wait_for(lambda: all(len(c.got) >= expected[i] for i, c in enumerate(clients)), 20)
    time.sleep(0.3)  # anything extra (a duplicate, an echo) would arrive by now
    for i, c in enumerate(clients):
        assert len(c.got) == expected[i], i
        assert len(set(c.got)) == len(c.got)  # exactly once
        assert not any(m.startswith(f"{i}:") for m in c.got)  # no echo to the sender
        for sender in range(40):
            theirs = [m for m in c.got if m.startswith(f"{sender}:")]
            assert theirs == ([] if sender == i else sent_by[sender])  # per-sender order
    for c in clients:
        c.ws.close()
    assert wait_for(lambda: admin(a_admin, "GET", "/admin/channels/room:lobby")[1]["connections"] == [], 10)
    with urllib.request.urlopen(f"http://127.0.0.1:{a_admin}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    published_a = sum(1 for n in range(200) if (n * 7) % 40 < 20)
    assert f"wsgateway_broadcast_messages_total {float(published_a)}" in metrics


def test_admin_publish_on_one_node_reaches_a_user_on_the_other(two_nodes: tuple[Any, int, Any, int]) -> None:
    a, a_admin, b, _b_admin = two_nodes
    tok = jwt.encode({"sub": "u42", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    me = Listener(f"{b.url}/me", additional_headers={"Authorization": f"Bearer {tok}"})
    other = Listener(f"{b.url}/me", additional_headers={
        "Authorization": "Bearer " + jwt.encode({"sub": "u7", "exp": int(time.time()) + 300}, SECRET,
                                                algorithm="HS256")})
    assert wait_for(lambda: len(admin(a_admin, "GET", "/admin/channels/user:u42")[1]["connections"]) == 1, 10)
    entry = admin(a_admin, "GET", "/admin/channels/user:u42")[1]["connections"][0]
    assert (entry["node"], entry["user"]) == ("gw-b", "u42")
    assert admin(a_admin, "POST", "/admin/publish", {"channel": "user:u42", "message": "hello u42"}) == (
        200, {"channel": "user:u42", "published": True, "bytes": 9})
    assert admin(a_admin, "POST", "/admin/publish", {"channel": "user:u42", "message": "AAEC/w==", "binary": True})[0] == 200
    assert wait_for(lambda: me.got == ["hello u42", b"\x00\x01\x02\xff"], 10), me.got
    # client_publish = no: what the user sends goes nowhere
    me.ws.send("not for anyone")
    time.sleep(0.3)
    assert other.got == [] and me.got == ["hello u42", b"\x00\x01\x02\xff"]
    assert admin(a_admin, "POST", "/admin/publish", {"channel": "x"})[0] == 400
    assert admin(a_admin, "POST", "/admin/publish", {"channel": "x", "message": "%%", "binary": True})[0] == 400


def test_redis_dying_leaves_proxying_alone_and_broadcast_comes_back(
    two_nodes: tuple[Any, int, Any, int], redis_server: RedisServer
) -> None:
    a, a_admin, b, _b_admin = two_nodes
    sub = Listener(f"{b.url}/room/r1")
    pub = Listener(f"{a.url}/room/r1")
    assert wait_for(lambda: len(admin(a_admin, "GET", "/admin/channels/room:r1")[1]["connections"]) == 2, 10)
    proxied = connect(f"{a.url}/proxy/x", open_timeout=5)
    redis_server.kill()
    assert wait_for(lambda: admin(a_admin, "GET", "/readyz") == (200, admin(a_admin, "GET", "/readyz")[1])
                    and admin(a_admin, "GET", "/readyz")[1]["status"] == "degraded", 10)
    # proxying, old and new connections, is untouched
    proxied.send("still here")
    assert proxied.recv(timeout=5) == "still here"
    with connect(f"{a.url}/proxy/y", open_timeout=5) as ws:
        ws.send("new")
        assert ws.recv(timeout=5) == "new"
    # a new broadcast client is refused while the broker is down
    with pytest.raises(InvalidStatus) as info:
        connect(f"{a.url}/room/r1", open_timeout=5)
    assert info.value.response.status_code == 503
    redis_server.start()
    assert wait_for(lambda: admin(a_admin, "GET", "/readyz")[1]["status"] == "ready", 15)
    # the subscriber that stayed connected gets messages again (its node resubscribed)
    assert wait_for(lambda: (pub.ws.send("after"), "after" in sub.got)[1] if not pub.closed else False, 15), (
        sub.got, pub.closed)
    proxied.close()
    assert "redis" in a.log().lower()


def test_a_slow_subscriber_is_closed_and_the_room_goes_on(redis_server: RedisServer, start_gateway: Any,
                                                         make_upstream: Any) -> None:
    port = free_port()
    # write_buffer bounds each subscriber's queue: roomy enough for a reader
    # that keeps reading (a Python thread here, on a busy machine), far too
    # small for one that never reads
    gw = start_gateway(node_ini("gw-s", port, make_upstream().node, limits="write_buffer = 6M"))
    fast = Listener(f"{gw.url}/room/big")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    # never read by us; uncompressed, so that the 64 KiB messages fill its socket
    slow = connect(f"{gw.url}/room/big", sock=sock, max_queue=1, open_timeout=5, compression=None)
    publisher = connect(f"{gw.url}/room/big", open_timeout=5)
    chunk = b"x" * 65536
    for i in range(300):
        publisher.send(chunk[:-4] + i.to_bytes(4, "big"))
    assert wait_for(lambda: len(fast.got) == 300, 60), len(fast.got)
    assert [int.from_bytes(m[-4:], "big") for m in fast.got] == list(range(300))
    got = 0
    with pytest.raises(ConnectionClosed) as info:
        while True:
            slow.recv(timeout=10)
            got += 1
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "slow consumer")
    assert got < 300
    publisher.close()
    fast.ws.close()
    assert wait_for(lambda: "dropped=" in gw.log() and "code=1008" in gw.log(), 10), gw.log()


def test_a_proxied_client_gets_pushes_from_any_node_between_upstream_messages(
    two_nodes: tuple[Any, int, Any, int]
) -> None:
    a, a_admin, b, _b_admin = two_nodes
    tok = jwt.encode({"sub": "u9", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    with connect(f"{b.url}/inbox/x", additional_headers={"Authorization": f"Bearer {tok}"}, open_timeout=5) as ws:
        assert wait_for(lambda: len(admin(a_admin, "GET", "/admin/channels/user:u9")[1]["connections"]) == 1, 10)
        ws.send("echo me")
        assert ws.recv(timeout=5) == "echo me"
        assert admin(a_admin, "POST", "/admin/publish", {"channel": "user:u9", "message": "push 1"})[0] == 200
        assert admin(a_admin, "POST", "/admin/publish", {"channel": "news", "message": "AQI=", "binary": True})[0] == 200
        assert ws.recv(timeout=5) == "push 1"
        assert ws.recv(timeout=5) == b"\x01\x02"
        # the proxied conversation goes on around the pushes
        big = "y" * 300_000  # several frames' worth from the upstream while pushes arrive
        ws.send(big)
        for i in range(5):
            admin(a_admin, "POST", "/admin/publish", {"channel": "user:u9", "message": f"p{i}"})
        got = [ws.recv(timeout=5) for _ in range(6)]
        assert big in got and [m for m in got if m != big] == [f"p{i}" for i in range(5)]
    assert wait_for(lambda: admin(a_admin, "GET", "/admin/channels/user:u9")[1]["connections"] == [], 10)
    assert "messages_out=9" in b.log()


def test_starting_without_redis_proxies_and_refuses_broadcast(start_gateway: Any, make_upstream: Any) -> None:
    port = free_port()
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gw = start_gateway(node_ini("gw-x", port, make_upstream().node, nowhere))  # starts at once, Redis or not
    assert wait_for(lambda: admin(port, "GET", "/readyz")[1].get("status") == "degraded", 10)
    assert admin(port, "GET", "/readyz")[0] == 200
    with connect(f"{gw.url}/proxy/x", open_timeout=5) as ws:
        ws.send("proxied")
        assert ws.recv(timeout=5) == "proxied"
    with pytest.raises(InvalidStatus) as info:
        connect(f"{gw.url}/room/r", open_timeout=5)
    assert info.value.response.status_code == 503
    assert admin(port, "POST", "/admin/publish", {"channel": "room:r", "message": "x"})[0] == 503


def test_shutdown_tells_broadcast_clients_1001(start_gateway: Any, make_upstream: Any) -> None:
    port = free_port()
    gw = start_gateway(node_ini("gw-d", port, make_upstream().node,
                                gateway="drain_grace = 0.2\n        shutdown_timeout = 2"))
    clients = [Listener(f"{gw.url}/room/bye") for _ in range(3)]
    assert wait_for(lambda: len(admin(port, "GET", "/admin/channels/room:bye")[1]["connections"]) == 3, 10)
    assert gw.stop() == 0
    for c in clients:
        c.thread.join(10)
        assert c.closed == (1001, "server shutting down")


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (rawws.frame(rawws.OP_TEXT, b"evil", rsv=2), 1002),  # a reserved bit without an extension
        (rawws.frame(rawws.OP_TEXT, b"\xff"), 1007),  # Autobahn reads broadcast payloads: UTF-8 is checked
        (rawws.frame(rawws.OP_CLOSE, (1005).to_bytes(2, "big")), 1002),
    ],
    ids=["rsv2", "utf8", "close-1005"],
)
def test_a_malformed_frame_on_a_broadcast_route_gets_a_close_frame_not_an_abort(
    start_gateway: Any, make_upstream: Any, bad: bytes, code: int
) -> None:
    """As on proxy routes: a close frame with the code and a reason, then the end of the stream (issue 16 item 14)."""
    gw = start_gateway(node_ini("gw-f", free_port(), make_upstream().node))
    with rawws.raw_connect(gw.port) as sock:
        sock.sendall(rawws.upgrade_request("/room/frames"))
        head, rest = rawws.read_head(sock)
        assert rawws.parse_head(head)[1] == 101
        reader = rawws.FrameReader(sock, rest)
        sock.sendall(bad)
        for _ in range(10):  # anything the channel sends first (nothing, today), then the close
            try:
                got = reader.read_frame(timeout=5)
            except EOFError as e:
                pytest.fail(f"no close frame, the connection was dropped: {e}")
            if got.opcode == rawws.OP_CLOSE:
                break
        assert got.opcode == rawws.OP_CLOSE
        got_code, reason = got.close
        assert got_code == code
        assert reason
        if bad[0] & 0x0F != rawws.OP_CLOSE:
            # the close we sent first already began the closing handshake: the gateway's close ends
            # it, and the gateway may drop TCP at once, so a second close would meet a reset
            sock.sendall(rawws.frame(rawws.OP_CLOSE, code.to_bytes(2, "big")))
        reader.wait_eof(5)
    # not the TCP abort's warning ("dropping connection to peer ... with abort=True"), and
    # no warning at all: a peer's protocol error is the access line's close code, as on proxy routes
    assert "abort=True" not in gw.log()
    assert not [line for line in gw.log().splitlines() if "autobahn" in line and "#warn]" in line]
