"""The gateway config and admin calls of the broadcast tests (test_channels, test_history)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

TOKEN = "channels-admin-token"
SECRET = "c" * 32


def node_ini(node_id: str, admin: int, echo: str, redis_url: str = "", limits: str = "", gateway: str = "") -> str:
    redis = f"[redis]\n        url = {redis_url}\n        prefix = t" if redis_url else ""
    return f"""
        [gateway]
        node_id = {node_id}
        listen = tcp:{{port}}:interface=127.0.0.1
        {gateway}

        [admin]
        listen = tcp:{admin}:interface=127.0.0.1
        token = {TOKEN}

        [auth]
        secret = {SECRET}

        [limits]
        {limits}

        [log]
        format = text
        level = info

        {redis}

        [upstream:echo]
        nodes = {echo}

        [route:room]
        path = /room/{{room}}
        mode = broadcast
        channel = room:{{room}}
        auth = none

        [route:me]
        path = /me
        mode = broadcast
        channel = user:{{claims.sub}}
        client_publish = no

        [route:proxy]
        path = /proxy/**
        upstream = echo
        auth = none

        [route:inbox]
        path = /inbox/**
        upstream = echo
        subscribe = user:{{claims.sub}} news
        """


def admin(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
