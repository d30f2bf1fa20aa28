"""
docs/deploy.md followed in a scratch root: the production sample
(etc/wsgateway.ini) with only its certificate paths and origins filled in,
the certbot deploy hook (etc/certbot/deploy-hook), Twisted's plugin cache in
a venv the service user cannot write, and ``systemd-analyze verify`` of the
unit, run by a user without privileges.

Where the guide has the service user ``wsgateway``, these tests use
``nobody`` when they run as root (``setpriv`` drops to it), else the user
running them, whose install is then made read-only for it by hand.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from support.gateway import ROOT, free_port, quiet_port, source_copy, source_env, spawn_gateway
from support.tlsclient import drained
from support.waiting import wait_for

SAMPLE = ROOT / "etc" / "wsgateway.ini"
UNIT = ROOT / "etc" / "systemd" / "wsgateway.service"
HOOK = ROOT / "etc" / "certbot" / "deploy-hook"
GUIDE = ROOT / "docs" / "deploy.md"
LOCK = ROOT / "requirements" / "lock.txt"
# Twisted's plugin cache, written by the installing user (docs/deploy.md, the unit's header)
CACHE_CMD = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
ORIGIN = "https://app.wsgateway.test"


def service_user() -> tuple[list[str], str, str]:
    """
    (command prefix, user, group) of the service's stand-in: a user that
    owns nothing of the install.
    """
    if os.geteuid() == 0:
        pw = pwd.getpwnam("nobody")
        group = grp.getgrgid(pw.pw_gid).gr_name
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"], pw.pw_name, group
    return [], pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def lineage(folder: Path, ca: trustme.CA) -> tuple[Path, trustme.LeafCert]:
    """A certbot lineage: live/NAME/{fullchain,privkey}.pem, symlinks into archive/NAME/, root-only folders."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    archive, live = folder / "archive" / "gw", folder / "live" / "gw"
    archive.mkdir(parents=True, exist_ok=True)
    live.mkdir(parents=True, exist_ok=True)
    n = len(list(archive.glob("fullchain*.pem"))) + 1
    (archive / f"fullchain{n}.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    (archive / f"privkey{n}.pem").write_bytes(cert.private_key_pem.bytes())
    (archive / f"privkey{n}.pem").chmod(0o600)
    for name in ("fullchain", "privkey"):
        link = live / f"{name}.pem"
        link.unlink(missing_ok=True)
        link.symlink_to(f"../../archive/gw/{name}{n}.pem")
    for path in (folder / "archive", folder / "live"):
        path.chmod(0o700)  # as certbot leaves them: why the hook copies the files out
    return live, cert


def run_hook(live: Path | None, tls_dir: Path, reload: str, **env: str) -> subprocess.CompletedProcess[str]:
    prefix, user, group = service_user()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WSGATEWAY_", "RENEWED_"))}
    environ.update(WSGATEWAY_TLS_DIR=str(tls_dir), WSGATEWAY_USER=user, WSGATEWAY_GROUP=group,
                   WSGATEWAY_RELOAD=reload, **env)
    if live is not None:
        environ["RENEWED_LINEAGE"] = str(live)
    return subprocess.run([str(HOOK)], env=environ, capture_output=True, text=True, timeout=60)


def production_ini(etc: Path, *, tls_port: int, admin_port: int, node: str) -> str:
    """
    The production sample as an operator fills it in (certificate paths,
    origins), plus what a test must change: free ports on loopback and the
    test's upstream.
    """
    text = SAMPLE.read_text()
    filled = text.replace("Key=/etc/wsgateway/tls/", f"Key={etc}/tls/").replace(
        "\n    https://app.example.com\n", f"\n    {ORIGIN}\n")
    assert filled.count(f"Key={etc}/tls/") == 2 and ORIGIN in filled
    for old, new in (("ssl:8443:", f"ssl:{tls_port}:interface=127.0.0.1:"),
                     ("tcp:9090:interface=127.0.0.1", f"tcp:{admin_port}:interface=127.0.0.1"),
                     ("\n    ws://127.0.0.1:9000\n", f"\n    {node}\n")):
        assert filled.count(old) == 1, old
        filled = filled.replace(old, new)
    return filled


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # verifies the chain and the host name
    ca.configure_trust(ctx)
    return ctx


def wss(port: int, ctx: ssl.SSLContext, origin: str) -> ClientConnection:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return connect(f"wss://localhost:{port}/app", sock=sock, ssl=drained(ctx), origin=Origin(origin),
                       open_timeout=10, close_timeout=1)
    except BaseException:
        sock.close()
        raise


def served_certificate(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def check(ini: Path) -> subprocess.CompletedProcess[str]:
    """wsgateway-check of this working tree (the ExecStartPre of the unit)."""
    return subprocess.run([sys.executable, "-m", "wsgateway.config", str(ini)], env=source_env(),
                          capture_output=True, text=True, timeout=60)


# -------------------------------------------------------- etc/certbot/deploy-hook


def test_deploy_hook_copies_the_lineage_with_modes_the_gateway_accepts_then_reloads(tmp_path):
    assert os.access(HOOK, os.X_OK), "etc/certbot/deploy-hook must be executable (git keeps the mode)"
    live, cert = lineage(tmp_path / "letsencrypt", trustme.CA())
    tls_dir = tmp_path / "etc" / "wsgateway" / "tls"  # does not exist yet: the hook makes it
    seen = tmp_path / "seen-at-reload"
    # the reload command records what was in place when it ran
    done = run_hook(live, tls_dir, f'stat -c "%n %a %U:%G" "{tls_dir}" "{tls_dir}"/*.pem > "{seen}"')
    assert done.returncode == 0, done.stderr
    _, user, group = service_user()
    me = pwd.getpwuid(os.getuid()).pw_name
    assert seen.read_text().splitlines() == [
        f"{tls_dir} 750 {me}:{group}",
        f"{tls_dir}/fullchain.pem 640 {me}:{group}",
        # owned by the service user and private: a group-readable key is refused by the gateway
        f"{tls_dir}/privkey.pem 400 {user}:{group}",
    ]
    assert (tls_dir / "fullchain.pem").read_bytes() == (live / "fullchain.pem").read_bytes()
    assert (tls_dir / "privkey.pem").read_bytes() == cert.private_key_pem.bytes()
    assert not (tls_dir / "privkey.pem").is_symlink()  # a copy, not a link into root-only archive/
    assert sorted(p.name for p in tls_dir.iterdir()) == ["fullchain.pem", "privkey.pem"]  # no temporary left
    assert "reloading" in done.stdout


def test_deploy_hook_refuses_without_a_lineage_and_keeps_the_installed_files(tmp_path):
    tls_dir = tmp_path / "tls"
    reloaded = tmp_path / "reloaded"
    reload = f'touch "{reloaded}"'

    done = run_hook(None, tls_dir, reload)
    assert done.returncode == 2
    assert "RENEWED_LINEAGE is not set" in done.stderr
    assert not tls_dir.exists() and not reloaded.exists()

    live, first = lineage(tmp_path / "letsencrypt", trustme.CA())
    assert run_hook(live, tls_dir, "true").returncode == 0
    (tmp_path / "letsencrypt" / "archive" / "gw" / "privkey1.pem").unlink()  # a broken lineage
    done = run_hook(live, tls_dir, reload)
    assert done.returncode == 1
    assert f"{live}/privkey.pem: not a readable file; nothing copied" in done.stderr
    assert (tls_dir / "privkey.pem").read_bytes() == first.private_key_pem.bytes()
    assert not reloaded.exists()

    # a refused reload (the unit's ExecReload check failed) fails the hook: certbot reports it
    live, _ = lineage(tmp_path / "letsencrypt", trustme.CA())
    done = run_hook(live, tls_dir, "echo config rejected >&2; exit 3")
    assert done.returncode == 3 and "config rejected" in done.stderr


# ------------------------------------------------------------ etc/wsgateway.ini


def test_production_sample_in_a_scratch_root_checks_starts_serves_wss_and_takes_a_renewal(tmp_path, make_upstream):
    up = make_upstream()
    etc = tmp_path / "etc" / "wsgateway"
    etc.mkdir(parents=True)
    ca = trustme.CA()
    live, first = lineage(tmp_path / "letsencrypt", ca)
    assert run_hook(live, etc / "tls", "true").returncode == 0
    tls_port, admin_port = free_port(), free_port()
    ini = etc / "wsgateway.ini"
    ini.write_text(production_ini(etc, tls_port=tls_port, admin_port=admin_port, node=up.node))

    done = check(ini)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == f"{ini}: OK, 1 route, 1 upstream\n"

    # spawn_gateway writes the same text to the same file again and runs twistd from it
    gw = spawn_gateway(etc, ini.read_text(), name="wsgateway", port=tls_port)
    try:
        ctx = trusting(ca)
        with wss(tls_port, ctx, ORIGIN) as ws:
            ws.send("through the production sample")
            assert ws.recv(timeout=10) == "through the production sample"
        with pytest.raises(InvalidStatus) as refused:
            wss(tls_port, ctx, "https://elsewhere.example")
        assert refused.value.response.status_code == 403
        assert served_certificate(tls_port, ctx) == der_of(first)

        # certbot renews: the hook copies the new files and reloads (SIGHUP here, as ExecReload sends)
        live, renewed = lineage(tmp_path / "letsencrypt", ca)
        done = run_hook(live, etc / "tls", f"kill -HUP {gw.proc.pid}")
        assert done.returncode == 0, done.stderr
        assert wait_for(lambda: served_certificate(tls_port, ctx) == der_of(renewed), 10), gw.log()
        with wss(tls_port, ctx, ORIGIN) as ws:
            ws.send("after the renewal")
            assert ws.recv(timeout=10) == "after the renewal"
    finally:
        assert gw.stop() == 0, gw.log()
    log = gw.log()
    assert log.lstrip().startswith("{"), log[:200]  # [log] format = json
    assert '"level": "info"' in log and "Unable to write to plugin cache" not in log


# ------------------------------------------- the install: venv, plugin cache, unit


@pytest.fixture(scope="module")
def scratch_root() -> Iterator[Path]:
    """
    docs/deploy.md's install into ROOT/opt/wsgateway/venv, a fresh venv from
    the lock, as the installing (root) user; ROOT is world-readable like /,
    so the service user can reach the venv and the config. The venv is made
    with the system's Python, as the guide says: the service user must be
    able to run the interpreter its bin/python links to.
    """
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    root = Path(tempfile.mkdtemp(prefix="wsgw-scratch-root-"))
    try:
        root.chmod(0o755)
        venv = root / "opt" / "wsgateway" / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--constraint", str(LOCK)]
        subprocess.run([*pip, "pip", "setuptools", "wheel"], check=True, timeout=300, cwd=root)
        # from a copy: a build writes build/ into the tree it builds (see source_copy)
        src = source_copy(Path(tempfile.mkdtemp(prefix="wsgw-src-")) / "src")
        try:
            subprocess.run([*pip, "--no-build-isolation", str(src)], check=True, timeout=600, cwd=root)
        finally:
            shutil.rmtree(src.parent, ignore_errors=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as_service(root: Path, ini: Path, log: Path, wait_for_line: str) -> str:
    """twistd of ROOT's venv as the service user (the unit's ExecStart) until ``wait_for_line``, then SIGTERM."""
    prefix, _, _ = service_user()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    twistd = root / "opt" / "wsgateway" / "venv" / "bin" / "twistd"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*prefix, str(twistd), "-n", "--pidfile=", "wsgateway", "--config", str(ini)],
                                cwd="/", env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: wait_for_line in log.read_text() or proc.poll() is not None, 30), log.read_text()
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def test_plugin_cache_written_at_install_silences_the_service_users_warning(scratch_root):
    assert CACHE_CMD in GUIDE.read_text() and CACHE_CMD in UNIT.read_text()
    venv = scratch_root / "opt" / "wsgateway" / "venv"
    python = venv / "bin" / "python"
    (plugins,) = (venv / "lib").glob("python3*/site-packages/twisted/plugins")
    cache = plugins / "dropin.cache"
    cache.unlink(missing_ok=True)  # as pip leaves a new install: no cache
    prefix, user, group = service_user()

    etc = scratch_root / "etc" / "wsgateway"
    etc.mkdir(parents=True, exist_ok=True)
    etc.chmod(0o755)
    live, _ = lineage(Path(tempfile.mkdtemp(dir=scratch_root)), trustme.CA())
    assert run_hook(live, etc / "tls", "true").returncode == 0
    ini = etc / "wsgateway.ini"
    # started twice on the same ports: below the ephemeral range, so that the
    # other test worker's outgoing connections cannot take them in between
    ini.write_text(production_ini(etc, tls_port=quiet_port(), admin_port=quiet_port(), node="ws://127.0.0.1:9"))
    ini.chmod(0o644)
    listening = "admin listening on"

    if not prefix:  # not root: make the venv's plugin folder read-only, as root's install is to the service user
        plugins.chmod(0o555)
    try:
        first = run_as_service(scratch_root, ini, scratch_root / "first.log", listening)
        # the issue's symptom: the service user cannot write the cache, on every start
        assert f"Unable to write to plugin cache {cache}: error number 13" in first
        assert not cache.exists()

        # the fix, as the installing user (the owner of the venv)
        if not prefix:
            plugins.chmod(0o755)
        done = subprocess.run([str(python), "-c", CACHE_CMD], cwd="/", capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert (done.returncode, done.stderr) == (0, "")
        assert cache.is_file()
        if not prefix:
            plugins.chmod(0o555)

        second = run_as_service(scratch_root, ini, scratch_root / "second.log", listening)
        assert "plugin cache" not in second
        assert "wsgateway node" in second  # the same start, served from the installed package
    finally:
        plugins.chmod(0o755)


def test_systemd_analyze_verify_in_a_scratch_root_without_privileges(scratch_root):
    """
    The command docs/deploy.md gives: ``systemd-analyze --root=ROOT verify
    wsgateway.service``. It needs neither root nor systemd as PID 1, only
    the unit files it names under ROOT (ROOT/usr/lib/systemd/system: the
    targets the unit is ordered against) and its commands' executables
    under ROOT (ROOT/opt/wsgateway/venv/bin/...).
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: `make test` installs it (Debian package systemd)"
    command = "systemd-analyze --root=$ROOT verify wsgateway.service"
    assert command in GUIDE.read_text()
    system = scratch_root / "etc" / "systemd" / "system"
    system.mkdir(parents=True, exist_ok=True)
    shutil.copy(UNIT, system / "wsgateway.service")
    vendor = scratch_root / "usr" / "lib" / "systemd" / "system"
    if not vendor.exists():
        shutil.copytree("/usr/lib/systemd/system", vendor, symlinks=True)
    for path in (scratch_root / "etc", scratch_root / "etc" / "systemd", system, scratch_root / "usr",
                 scratch_root / "usr" / "lib", scratch_root / "usr" / "lib" / "systemd"):
        path.chmod(0o755)
    prefix, _, _ = service_user()

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, analyze, f"--root={scratch_root}", "verify", "wsgateway.service"],
                              cwd="/", capture_output=True, text=True, timeout=60)

    done = verify()
    assert (done.returncode, done.stderr) == (0, ""), done.stderr  # warnings (unknown keys) count too

    # it does look inside ROOT: a command missing there fails it, named
    (scratch_root / "opt" / "wsgateway" / "venv" / "bin" / "twistd").rename(scratch_root / "twistd.away")
    try:
        done = verify()
        assert done.returncode != 0
        assert "Command /opt/wsgateway/venv/bin/twistd is not executable" in done.stderr
    finally:
        (scratch_root / "twistd.away").rename(scratch_root / "opt" / "wsgateway" / "venv" / "bin" / "twistd")
    assert stat.S_IMODE((system / "wsgateway.service").stat().st_mode) & 0o004  # readable by the non-root verify
