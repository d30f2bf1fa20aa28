"""
The daemon as an operator runs it: a plain install, twistd in the
foreground and daemonized, config errors, the default config, SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from support.gateway import ROOT, TWISTD, default_config, free_port, proxy_ini, source_copy, source_env, wait_port
from support.waiting import wait_for
from support.tlsclient import drained

BAD = sorted((ROOT / "tests" / "data" / "bad").glob("*.ini"))


def wss_echo_client(port: int, ca_file: Path) -> Any:
    """wss://localhost:PORT/echo (dialled on 127.0.0.1), trusting only ``ca_file``."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    # close_timeout: a clean close over TLS takes the gateway's 5 s close timer
    return connect(f"wss://localhost:{port}/echo", sock=sock, ssl=drained(ctx), close_timeout=0.5)


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory) -> Path:
    """A new venv with the wheel installed the plain way (not editable, not from the source tree)."""
    work = tmp_path_factory.mktemp("install")
    # the locked versions, build tools included: the same install as `make`'s
    lock = ["--constraint", str(ROOT / "requirements" / "lock.txt")]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", *lock,
         "-w", str(work / "dist"), str(source_copy(work / "src"))],
        check=True,
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("wsgateway-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *lock, str(wheel)], check=True, cwd=work)
    return venv


def test_sdist_ships_the_license_docs_lock_and_sample_files(tmp_path):
    # built from a copy: setuptools writes its egg-info next to setup.cfg
    src = source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('dist')"],
                   check=True, cwd=src, capture_output=True)
    (sdist,) = (src / "dist").glob("wsgateway-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for expected in ("LICENSE", "README.md", "etc/wsgateway.ini", "etc/development.ini", "etc/systemd/wsgateway.service",
                     "etc/logrotate.d/wsgateway", "etc/certbot/deploy-hook", "docs/configuration.md",
                     "docs/deploy.md", "requirements/lock.txt",
                     "twisted/plugins/wsgateway_plugin.py"):
        assert expected in names, f"{expected} is missing from the sdist (MANIFEST.in)"
    assert not any(n.endswith("dropin.cache") or "__pycache__" in n for n in names)


def test_wheel_ships_the_plugin_and_no_package_init_or_cache(fresh_install):
    (wheel,) = (fresh_install.parent / "dist").glob("wsgateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/wsgateway_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any("dropin.cache" in n for n in names)


def test_plain_install_twistd_lists_and_runs_the_plugin(fresh_install, tmp_path):
    twistd = fresh_install / "bin" / "twistd"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(twistd), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert out.returncode == 0
    assert "wsgateway" in out.stdout

    config, port, tls_port = default_config(tmp_path)
    proc = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "wsgateway", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc=proc)
        with connect(f"ws://127.0.0.1:{port}/echo") as ws:
            ws.send("through a plain install")
            assert ws.recv(timeout=5) == "through a plain install"
        with wss_echo_client(tls_port, tmp_path / "var" / "tls" / "cert.pem") as ws:
            ws.send("through a plain install, over tls")
            assert ws.recv(timeout=5) == "through a plain install, over tls"
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0


def test_default_config_serves_echo_and_chat_out_of_the_box(tmp_path, start_gateway):
    config, port, tls_port = default_config(tmp_path)
    # start_gateway writes the INI into tmp_path itself: point it at var/tls/ directly
    tls_dir = tmp_path / "var" / "tls"
    gw = start_gateway(config.read_text().replace("../var/tls/", f"{tls_dir}/"), port=port)
    with connect(f"{gw.url}/echo") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x01\x02")
        assert ws.recv(timeout=5) == b"\x01\x02"
    with wss_echo_client(tls_port, tls_dir / "cert.pem") as ws:
        ws.send("hello over tls")
        assert ws.recv(timeout=5) == "hello over tls"
    with connect(f"{gw.url}/chat/lobby") as alice, connect(f"{gw.url}/chat/lobby") as bob:
        # join notices first: alice sees her own and bob's, bob sees his own
        assert json.loads(alice.recv(timeout=5))["event"] == "join"
        assert json.loads(alice.recv(timeout=5))["members"] == 2
        assert json.loads(bob.recv(timeout=5))["event"] == "join"
        alice.send("hi bob")
        assert json.loads(bob.recv(timeout=5))["text"] == "hi bob"
        assert json.loads(alice.recv(timeout=5))["text"] == "hi bob"


def test_daemonized_with_pidfile_and_logfile(tmp_path, make_upstream):
    up = make_upstream()
    port = free_port()
    ini = tmp_path / "gw.ini"
    ini.write_text(proxy_ini(up.node).replace("{port}", str(port)).replace("\n        ", "\n"))
    pidfile, logfile = tmp_path / "gw.pid", tmp_path / "gw.log"
    done = subprocess.run(
        [TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "wsgateway", "--config", str(ini)],
        cwd=tmp_path,
        env=source_env(),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    wait_port(port)
    pid = int(pidfile.read_text())
    try:
        with connect(f"ws://127.0.0.1:{port}/x") as ws:
            ws.send("daemon")
            assert ws.recv(timeout=5) == "daemon"
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not pidfile.exists():
                break
            time.sleep(0.05)
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "wsgateway node" in log and "starting" in log
    assert "closed " in log  # the access line of the connection above


@pytest.mark.parametrize("bad", BAD, ids=[p.stem for p in BAD])
def test_bad_config_makes_twistd_exit_1_before_listening(bad, tmp_path):
    assert len(BAD) >= 10
    out = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=source_env(),
        timeout=60,
    )
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith(str(bad))]
    assert errors, out.stderr
    for line in errors:
        # "FILE: [section] key: problem" or "FILE: line N: problem" / "FILE: [section]: problem"
        rest = line[len(str(bad)) + 2 :]
        assert rest.startswith("[") or rest.startswith("line "), line
    assert "Traceback" not in out.stderr
    check = subprocess.run(
        [str(Path(TWISTD).with_name("wsgateway-check")), str(bad)], capture_output=True, text=True, env=source_env()
    )
    assert check.returncode == 1
    assert [line for line in check.stderr.splitlines() if line.startswith(str(bad))] == errors


def test_missing_config_file_exits_1(tmp_path):
    out = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "wsgateway", "--config", str(tmp_path / "nope.ini")],
        capture_output=True,
        text=True,
        env=source_env(),
        timeout=60,
    )
    assert out.returncode == 1
    assert "nope.ini" in out.stderr


def test_sigterm_drains_with_1001_and_exits_0(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(
        proxy_ini(up.node).replace(
            "listen = tcp:{port}:interface=127.0.0.1",
            "listen = tcp:{port}:interface=127.0.0.1\n        drain_grace = 0.5\n        shutdown_timeout = 5",
        )
    )
    with connect(gw.url + "/x") as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        waited = time.monotonic() - t0
    assert e.value.rcvd.code == 1001
    assert waited >= 0.4  # drain_grace passed before the 1001
    assert gw.proc.wait(15) == 0
    # the upstream got the 1001 too
    assert up.closes and up.closes[0][0] == 1001
    # no new connections once draining started
    with pytest.raises(OSError):
        connect(gw.url + "/x", open_timeout=2)


def test_json_logs_one_object_per_line_with_an_access_line(make_upstream, start_gateway):
    up = make_upstream()
    gw = start_gateway(proxy_ini(up.node).replace("format = text", "format = json"))
    with connect(gw.url + "/x?access_token=SECRET-TOKEN", additional_headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) as ws:
        ws.send("one")
        ws.recv(timeout=5)
        ws.close(4000, "bye")
    assert wait_for(lambda: "closed " in gw.log())
    lines = [json.loads(line) for line in gw.log().splitlines() if line.strip()]
    for entry in lines:
        assert {"time", "level", "event", "node_id"} <= entry.keys()
    start = [e for e in lines if "NVX acceleration active" in e["event"]]
    assert start, "the start line names Autobahn and its NVX acceleration"
    (access,) = [e for e in lines if e["event"].startswith("closed ")]
    assert access["route"] == "main" and access["upstream"] == "backend" and access["node"] == up.node
    assert access["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert access["code"] == 4000 and access["closed_by"] == "client"
    assert access["messages_in"] == 1 and access["messages_out"] == 1 and access["duration"] >= 0
    assert access["mirror_dropped"] == 0 and "msgs_in" not in access  # the text's names (issue 20)
    assert access["conn_id"] and access["peer"].startswith("tcp4:127.0.0.1:")
    assert "SECRET-TOKEN" not in gw.log()
    # and the upstream never saw the token either
    assert "SECRET-TOKEN" not in up.requests[0].path


def _listen_backlog(port: int) -> int:
    # for a listening socket, ss shows its accept-queue limit as Send-Q
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def test_listeners_queue_511_connections_unless_the_endpoint_says_otherwise(make_upstream, start_gateway):
    up = make_upstream()
    other = free_port()
    gw = start_gateway(proxy_ini(up.node).replace(
        "listen = tcp:{port}:interface=127.0.0.1",
        f"listen = tcp:{{port}}:interface=127.0.0.1 tcp:{other}:interface=127.0.0.1:backlog=64",
    ))
    wait_port(other)
    # Twisted's own default would be 50: too few for a reconnect storm
    assert _listen_backlog(gw.port) == 511
    assert _listen_backlog(other) == 64


def test_worker_sockets_and_tls_listeners_have_the_same_default_backlog():
    from wsgateway.tls import parse_listen
    from wsgateway.workers.parent import bind

    sock = bind("tcp:0:interface=127.0.0.1")  # what a parent binds for its workers
    try:
        assert _listen_backlog(sock.getsockname()[1]) == 511
    finally:
        sock.close()
    assert parse_listen("ssl:8443:privateKey=/k.pem").backlog == 511
