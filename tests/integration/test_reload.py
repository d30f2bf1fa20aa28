"""
SIGHUP re-reads the whole INI (docs/operations.md#signals-and-lifecycle): routes, upstreams, auth
keys, limits and the log level change for new connections, open ones are
not touched, and an invalid file changes nothing. A real twistd, real
clients, real upstreams.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import textwrap
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support.gateway import free_port, Gateway
from support.waiting import wait_for

ADMIN_TOKEN = "reload-test-admin-token-0123456789"


def gateway_ini(routes: str, upstreams: dict[str, str], *, extra: str = "", level: str = "info",
                admin: int | None = None, limits: str = "") -> str:
    """A config with one [upstream:NAME] per entry of ``upstreams`` (name -> node URL) and the given routes."""
    sections = "\n".join(
        f"[upstream:{name}]\nnodes = {node}\nconnect_timeout = 2\nretries = 0\n" for name, node in upstreams.items()
    )
    admin_section = (
        f"[admin]\nlisten = tcp:{admin}:interface=127.0.0.1\ntoken = {ADMIN_TOKEN}\n" if admin is not None else ""
    )
    return (
        f"[gateway]\nlisten = tcp:{{port}}:interface=127.0.0.1\n\n{admin_section}\n"
        f"[limits]\nping_interval = 0\n{limits}\n\n[log]\nlevel = {level}\nformat = text\n\n"
        f"{extra}\n{sections}\n{textwrap.dedent(routes)}"
    )


def rewrite(gw: Gateway, body: str) -> None:
    """Replace the gateway's INI whole (write aside, then rename), as an operator should."""
    tmp = gw.ini_path.with_suffix(".new")
    tmp.write_text(body.replace("{port}", gw.ini_port))
    os.replace(tmp, gw.ini_path)


def hup(gw: Gateway, done: str = "reloaded ") -> str:
    """SIGHUP, then wait for the log line saying the reload finished; returns the log written meanwhile."""
    before = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: done in gw.log()[before:], 10), gw.log()[before:]
    assert gw.proc.poll() is None, "SIGHUP ended the gateway"
    return gw.log()[before:]


def status_of(url: str, **kwargs: Any) -> int:
    """The HTTP status a handshake gets (101 when it opens)."""
    try:
        with connect(url, open_timeout=5, **kwargs):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def echo(ws: Any, text: str) -> None:
    ws.send(text)
    assert ws.recv(timeout=5) == text


def admin_get(port: int, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            status, kind, body = r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        status, kind, body = e.code, e.headers.get_content_type(), e.read()
    return status, json.loads(body) if kind == "application/json" else body.decode()


def admin_post(port: int, path: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


# -- routes and upstreams -------------------------------------------------------------


def test_a_route_moved_to_another_upstream_keeps_50_open_clients_talking_to_the_old_one(
    make_upstream, start_gateway
):
    x, y = make_upstream(), make_upstream()
    gw = start_gateway(gateway_ini("[route:a]\npath = /a/**\nupstream = x\n", {"x": x.node, "y": y.node}))
    n = 50
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(f"{gw.url}/a/{i}")) for i in range(n)]
        counts = [0] * n
        errors: list[str] = []
        stop = threading.Event()

        def talk(i: int) -> None:
            k = 0
            try:
                while not stop.is_set():
                    echo(clients[i], f"old-{i}-{k}")
                    counts[i] += 1
                    k += 1
                    time.sleep(0.01)
            except Exception as e:  # any failure fails the test below
                errors.append(f"client {i}: {e!r}")

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        assert wait_for(lambda: min(counts) >= 2, 10)
        # /a now goes to y, and x is gone from the file altogether
        rewrite(gw, gateway_ini("[route:a]\npath = /a/**\nupstream = y\n", {"y": y.node}))
        log = hup(gw)
        assert "1 routes, 1 upstreams (1 kept as they were, 0 new or changed, 1 removed)" in log
        at_reload = list(counts)
        # every old client carries on through and after the reload
        assert wait_for(lambda: all(c >= a + 3 for c, a in zip(counts, at_reload)), 15), (errors, counts)
        # a new client goes to y
        with connect(f"{gw.url}/a/new") as new:
            echo(new, "new client")
        stop.set()
        for t in threads:
            t.join(10)
        assert errors == []
    assert [r.path for r in y.requests] == ["/a/new"]
    assert y.received == ["new client"]
    assert len(x.requests) == n
    assert len(x.received) == sum(counts)
    assert all(m.startswith("old-") for m in x.received)
    # their ends went to the removed upstream's own objects: no error, one access line each
    assert wait_for(lambda: gw.log().count("closed ") >= n + 1, 10)
    assert "Traceback" not in gw.log()
    assert gw.stop() == 0


def test_a_route_added_by_a_reload_serves_new_connections(make_upstream, start_gateway):
    up = make_upstream()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}))
    assert status_of(f"{gw.url}/b") == 404
    rewrite(gw, gateway_ini(routes + "\n[route:b]\npath = /b\nupstream = x\n", {"x": up.node}))
    assert "reloaded " + str(gw.ini_path) + ": 2 routes, 1 upstreams" in hup(gw)
    with connect(f"{gw.url}/b") as ws:
        echo(ws, "on the new route")
    with connect(f"{gw.url}/a") as ws:
        echo(ws, "on the old route")
    assert [r.path for r in up.requests] == ["/b", "/a"]


def test_an_unchanged_upstream_keeps_its_state_and_a_changed_one_starts_afresh(make_upstream, start_gateway):
    x, y = make_upstream(), make_upstream()
    admin = free_port()
    routes = "[route:a]\npath = /a\nupstream = x\n\n[route:b]\npath = /b\nupstream = y\n"
    gw = start_gateway(gateway_ini(routes, {"x": x.node, "y": y.node}, admin=admin))
    wait_for(lambda: admin_get(admin, "/readyz")[0] == 200, 5)
    # node state that only lives in the Upstream object: drained through the admin API
    assert admin_post(admin, "/admin/upstreams/x/drain", {"node": x.node}) == 200
    assert admin_post(admin, "/admin/upstreams/y/drain", {"node": y.node}) == 200
    # y changes (a new retries value), x does not; a route is added
    body = gateway_ini(routes + "\n[route:c]\npath = /c\nupstream = x\n", {"x": x.node, "y": y.node}, admin=admin)
    rewrite(gw, body.replace(f"[upstream:y]\nnodes = {y.node}\nconnect_timeout = 2\nretries = 0",
                             f"[upstream:y]\nnodes = {y.node}\nconnect_timeout = 2\nretries = 1"))
    assert "(1 kept as they were, 1 new or changed, 0 removed)" in hup(gw)
    _, ready = admin_get(admin, "/readyz")
    assert ready["upstreams"]["x"]["nodes"][0]["state"] == "draining"  # the same object, drain and all
    assert ready["upstreams"]["y"]["nodes"][0]["state"] == "healthy"  # a new one
    assert status_of(f"{gw.url}/a") == 503  # x's only node still takes no new connections
    assert status_of(f"{gw.url}/b") == 101
    _, routes_now = admin_get(admin, "/admin/routes")
    assert [r["name"] for r in routes_now] == ["a", "b", "c"]


# -- limits, log level, auth ------------------------------------------------------------


def test_a_lower_per_ip_limit_applies_to_new_connections_and_keeps_open_ones(make_upstream, start_gateway):
    up = make_upstream()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}, limits="max_connections_per_ip = 10"))
    with contextlib.ExitStack() as stack:
        open_ = [stack.enter_context(connect(f"{gw.url}/a")) for _ in range(3)]
        rewrite(gw, gateway_ini(routes, {"x": up.node}, limits="max_connections_per_ip = 2"))
        hup(gw)
        for ws in open_:
            echo(ws, "still open")  # over the new limit, but not cut
        assert status_of(f"{gw.url}/a") == 429
        open_.pop().close()
        open_.pop().close()
        # the count carried over the reload: 1 open now, so one more fits
        assert wait_for(lambda: gw.log().count("closed ") == 2, 5)
        with connect(f"{gw.url}/a") as ws:
            echo(ws, "second of two")
            assert status_of(f"{gw.url}/a") == 429
    rewrite(gw, gateway_ini(routes, {"x": up.node}, limits="max_connections_per_ip = 0"))
    hup(gw)
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            echo(stack.enter_context(connect(f"{gw.url}/a")), "unlimited")


def test_a_reload_to_log_level_debug_takes_effect_at_once(make_upstream, start_gateway):
    up = make_upstream()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}))
    opened = re.compile(r"\bopen [0-9a-f]{12} route=a ")  # a debug line, one per connection
    with connect(f"{gw.url}/a") as ws:
        echo(ws, "at info")
    assert wait_for(lambda: "closed " in gw.log(), 5)
    assert not opened.search(gw.log())
    rewrite(gw, gateway_ini(routes, {"x": up.node}, level="debug"))
    assert "log level debug" in hup(gw)
    with connect(f"{gw.url}/a") as ws:
        echo(ws, "at debug")
    assert wait_for(lambda: opened.search(gw.log()), 5)
    # and back up: the reload's own line is still written, then info lines stop
    rewrite(gw, gateway_ini(routes, {"x": up.node}, level="warn"))
    assert "log level warn" in hup(gw)
    closed = gw.log().count("closed ")
    with connect(f"{gw.url}/a") as ws:
        echo(ws, "at warn")
    time.sleep(0.5)
    assert gw.log().count("closed ") == closed


def test_auth_secret_rotation_refuses_the_old_token_and_accepts_the_new(tmp_path, make_upstream, start_gateway):
    up = make_upstream()
    old_secret, new_secret = "o" * 32, "n" * 32
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(old_secret + "\n")
    secret_file.chmod(0o600)  # a secret file must be private (docs/configuration.md)
    auth = f"[auth]\nalgorithms = HS256\nsecret = file:{secret_file}\n"
    routes = "[route:a]\npath = /a\nupstream = x\nauth = required\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}, extra=auth))

    def token(secret: str) -> dict[str, str]:
        signed = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, secret, algorithm="HS256")
        return {"Authorization": f"Bearer {signed}"}

    with connect(f"{gw.url}/a", additional_headers=token(old_secret)) as held:
        echo(held, "old token")
        assert status_of(f"{gw.url}/a", additional_headers=token(new_secret)) == 401
        # the INI does not change, the file it names does: a reload re-reads it
        secret_file.write_text(new_secret + "\n")
        hup(gw)
        assert status_of(f"{gw.url}/a", additional_headers=token(old_secret)) == 401
        assert status_of(f"{gw.url}/a", additional_headers=token(new_secret)) == 101
        echo(held, "a connection made with the old secret is not cut")
    assert old_secret not in gw.log() and new_secret not in gw.log()


# -- what a reload cannot do ---------------------------------------------------------


def test_an_invalid_file_is_rejected_whole_and_logged_line_by_line(make_upstream, start_gateway):
    x, y = make_upstream(), make_upstream()
    admin = free_port()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": x.node, "y": y.node}, admin=admin, limits="max_connections_per_ip = 10"))
    with connect(f"{gw.url}/a") as held:
        echo(held, "before")
        # valid changes (a new route, /a to y, a lower limit) next to two typos: none of it may apply
        bad = gateway_ini(
            "[route:a]\npath = /a\nupstream = y\n\n[route:b]\npath = /b\nupstrem = y\n",
            {"x": x.node, "y": y.node}, admin=admin, limits="max_connections_per_ip = 1\nmax_conections = 5",
        )
        rewrite(gw, bad)
        log = hup(gw, "rejected")
        ini = str(gw.ini_path)
        errors = [line for line in log.splitlines() if f"{ini}: [" in line]
        assert any(f"{ini}: [limits] max_conections: unknown key 'max_conections'" in line for line in errors), log
        assert any(f"{ini}: [route:b] upstrem: unknown key 'upstrem'" in line for line in errors), log
        assert all("#error]" in line for line in errors), errors
        assert f"reload of {ini} rejected: " in log and "still running the previous configuration" in log
        echo(held, "after")
        # everything as before: /a to x, no /b, the old per-IP limit
        with connect(f"{gw.url}/a") as second:
            echo(second, "new connection, old config")
    assert status_of(f"{gw.url}/b") == 404
    assert [r.path for r in x.requests] == ["/a", "/a"] and y.requests == []
    status, metrics = admin_get(admin, "/metrics")
    assert status == 200
    assert 'wsgateway_config_reloads_total{result="error"} 1.0' in metrics
    assert 'wsgateway_config_reloads_total{result="ok"} 0.0' in metrics
    # fixed: the next SIGHUP takes it
    rewrite(gw, gateway_ini(routes + "\n[route:b]\npath = /b\nupstream = y\n", {"x": x.node, "y": y.node},
                            admin=admin))
    hup(gw)
    assert status_of(f"{gw.url}/b") == 101
    assert 'wsgateway_config_reloads_total{result="ok"} 1.0' in admin_get(admin, "/metrics")[1]


def test_settings_bound_at_start_are_kept_with_a_warning_and_the_rest_applies(make_upstream, start_gateway):
    up = make_upstream()
    other = free_port()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}))
    body = gateway_ini(routes + "\n[route:b]\npath = /b\nupstream = x\n", {"x": up.node})
    body = body.replace("listen = tcp:{port}:interface=127.0.0.1",
                        f"listen = tcp:{{port}}:interface=127.0.0.1 tcp:{other}:interface=127.0.0.1")
    body = body.replace("format = text", "format = json").replace("[gateway]\n", "[gateway]\nnode_id = renamed\n")
    rewrite(gw, body)
    log = hup(gw)
    assert "[gateway] listen, [gateway] node_id, [log] format changed, which takes a restart" in log
    assert status_of(f"{gw.url}/b") == 101  # the rest applied
    with pytest.raises(OSError):
        connect(f"ws://127.0.0.1:{other}/a", open_timeout=1)
    # still text logs, still the old node id
    last = gw.log().strip().splitlines()[-1]
    assert not last.startswith("{")


def test_sighup_during_shutdown_is_ignored_and_the_drain_finishes(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(
        gateway_ini("[route:a]\npath = /a\nupstream = x\n", {"x": up.node})
        .replace("[gateway]\n", "[gateway]\ndrain_grace = 1\nshutdown_timeout = 2\n")
    )
    with connect(f"{gw.url}/a") as ws:
        echo(ws, "hello")
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "draining 1 connections" in gw.log(), 5)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "SIGHUP during the shutdown drain" in gw.log(), 5)
    assert gw.proc.wait(15) == 0


def test_a_route_turned_at_least_once_by_a_reload_is_named_as_needing_a_restart(make_upstream, start_gateway):
    up = make_upstream()
    routes = "[route:a]\npath = /a\nupstream = x\n"
    gw = start_gateway(gateway_ini(routes, {"x": up.node}))
    rewrite(gw, gateway_ini(routes + "delivery = at_least_once\n", {"x": up.node}))
    log = hup(gw)
    assert "delivery = at_least_once (the durable queue opens at start) changed, which takes a restart" in log
    assert status_of(f"{gw.url}/a") == 101  # the route itself still works, as at_most_once
