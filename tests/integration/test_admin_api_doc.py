"""
docs/admin-api.md's curl examples, run as written (``/usr/bin/curl`` in
``bash``) against a real gateway on loopback: each answers with the status
the doc shows after it (``→ `NNN```), and its JSON has the keys of the
doc's answer, nested ones included (values differ: ports, ids, counts).

The gateway is configured as the doc says its examples assume: upstream
``chat`` of two nodes (the doc's ``ws://10.0.0.11:9000`` and
``ws://10.0.0.12:9000`` stand for this test's upstreams), routes ``chat``
and ``orders`` (at_least_once), one client connected (the doc's
``3f9a0c1d2e4b`` stands for its connection id), admin port
``127.0.0.1:9090`` (this test's port), token in ``$TOKEN``; and the
broadcast route ``feed`` (history on) with one subscriber on ``/feed/news``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from support.gateway import ROOT, free_port

DOC = ROOT / "docs" / "admin-api.md"
CURL = "/usr/bin/curl"
TOKEN = "doc-example-token-7c1e"
SKIPPED_SECTIONS: set[str] = set()
# Objects whose keys are names or statuses (upstreams, routes of the queue,
# handshakes by status...): their values are compared, not their keys.
NAME_KEYED = {"upstreams", "routes", "handshakes", "refusals", "by_status", "by_reason"}
EXAMPLE = re.compile(
    r"```sh\n(?P<command>curl .*?)\n```\n+→ `(?P<status>\d{3})`\n+```(?P<kind>json|text)\n(?P<answer>.*?)\n```",
    re.S,
)


@dataclass
class Example:
    section: str
    command: str
    status: int
    kind: str
    answer: str

    def __str__(self) -> str:
        return f"[{self.section}] {self.command}"


def examples() -> list[Example]:
    text = DOC.read_text()
    found = []
    for section in re.split(r"^(?=## )", text, flags=re.M):
        title = section.splitlines()[0][3:].strip() if section.startswith("## ") else ""
        if title in SKIPPED_SECTIONS:
            continue
        for m in EXAMPLE.finditer(section):
            found.append(Example(title, m["command"], int(m["status"]), m["kind"], m["answer"]))
    return found


def test_the_doc_has_an_example_for_every_endpoint() -> None:
    shown = {(e.command.split("-X ")[1].split()[0] if "-X " in e.command else "GET",
              re.sub(r"\?.*", "", e.command.split("http://127.0.0.1:9090")[1].strip('"')))
             for e in examples()}
    table = re.findall(r"^\| \[`(\w+) (/\S*)`\]", DOC.read_text(), re.M)
    assert len(table) >= 20
    for method, path in table:
        pattern = re.escape(path).replace("NAME", r"[^/]+").replace("ID", r"[^/]+")
        assert any(m == method and re.fullmatch(pattern, p) for m, p in shown), f"no example of {method} {path}"


def same_shape(doc: Any, got: Any, where: str, key: str = "") -> None:
    """``got`` has the doc's structure: the same keys in every object (values of NAME_KEYED objects alike)."""
    if isinstance(doc, dict):
        assert isinstance(got, dict), f"{where}: an object, not {got!r}"
        if key in NAME_KEYED:
            if doc and got:
                model = next(iter(doc.values()))
                for name, value in got.items():
                    same_shape(model, value, f"{where}.{name}", name)
            return
        assert set(got) == set(doc), f"{where}: keys {sorted(got)}, the doc shows {sorted(doc)}"
        for k, value in doc.items():
            same_shape(value, got[k], f"{where}.{k}", k)
    elif isinstance(doc, list):
        assert isinstance(got, list), f"{where}: a list, not {got!r}"
        if doc:
            for i, item in enumerate(got):
                same_shape(doc[0], item, f"{where}[{i}]")
    else:
        assert not isinstance(got, (dict, list)), f"{where}: {got!r}, the doc shows {doc!r}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from support.gateway import serve_upstream, spawn_gateway

    tmp = tmp_path_factory.mktemp("admin-doc")
    nodes = [serve_upstream(), serve_upstream()]
    admin, demo = free_port(), free_port()
    gw = spawn_gateway(tmp, f"""
[gateway]
listen = tcp:{{port}}:interface=127.0.0.1
node_id = gw-1

[admin]
listen = tcp:{admin}:interface=127.0.0.1
token = {TOKEN}

[log]
format = text

[demo]
listen = tcp:{demo}:interface=127.0.0.1

[queue]
path = queue.sqlite

[upstream:chat]
nodes = {nodes[0].node}
    {nodes[1].node}
retries = 0

[route:chat]
path = /chat/{{room}}
upstream = chat

[route:orders]
path = /orders
upstream = chat
delivery = at_least_once

[route:feed]
path = /feed/{{name}}
mode = broadcast
channel = feed:{{name}}
history_size = 100
""")
    try:
        with connect(f"{gw.url}/chat/lobby", open_timeout=5) as ws, \
                connect(f"{gw.url}/feed/news", open_timeout=5):
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            yield {"admin": str(admin), "node1": nodes[0].node, "node2": nodes[1].node, "gw_url": gw.url,
                   "log": str(gw.log_path)}
    finally:
        gw.stop()
        for up in nodes:
            up.server.shutdown()


def run(example: Example, gateway: dict[str, str], conn_id: str, tmp: Path) -> tuple[int, str]:
    command = (example.command
               .replace("127.0.0.1:9090", f"127.0.0.1:{gateway['admin']}")
               .replace("ws://10.0.0.11:9000", gateway["node1"])
               .replace("ws://10.0.0.12:9000", gateway["node2"])
               .replace("3f9a0c1d2e4b", conn_id))
    body = tmp / "body"
    # the doc's command line as it is, curl writing its body to a file and its status to stdout
    script = f'curl() {{ command {CURL} -sS --max-time 5 -o "$BODY" -w "%{{http_code}}" "$@"; }}\n{command}\n'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TOKEN": TOKEN, "BODY": str(body)})
    assert done.returncode == 0, f"{example}: {done.stderr}"
    return int(done.stdout.strip()[-3:]), body.read_text()


def test_every_curl_example_answers_as_the_doc_shows(gateway: dict[str, str], tmp_path: Path) -> None:
    found = examples()
    assert len(found) >= 24
    conn_id = ""
    for example in found:
        if "/close" in example.command and example.status == 200:
            # the fixture's chat connection, by its id: closed here, so nothing after needs it
            status, listing = run(Example("", 'curl -s -H "Authorization: Bearer $TOKEN" '
                                              "http://127.0.0.1:9090/admin/connections", 200, "json", ""),
                                  gateway, "", tmp_path)
            (conn,) = [c for c in json.loads(listing) if c["route"] == "chat"]
            conn_id = conn["conn_id"]
        status, text = run(example, gateway, conn_id, tmp_path)
        assert status == example.status, f"{example}: {status} {text}"
        if example.kind == "json":
            same_shape(json.loads(example.answer), json.loads(text), str(example),
                       "upstreams" if re.search(r"/admin/upstreams\b[^/]", example.command + " ") else "")
        else:
            assert text.startswith(example.answer.splitlines()[0]), f"{example}: {text[:200]}"
    assert conn_id, "the close example did not run"
