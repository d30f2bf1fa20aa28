"""
TLS client listeners without a gateway process: ``parse_listen`` (wsgateway/tls.py)
and the self-signed development certificate (``python -m
wsgateway.dev.selfsigned``). The listeners themselves, through real
``twistd`` gateways, are tests/integration/test_tls_listen.py.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.gateway import source_env
from wsgateway.tls import SSLListen, parse_listen


# -- helpers ----------------------------------------------------------------


# -- serving wss:// ---------------------------------------------------------------


# -- TLS 1.2 is the minimum ------------------------------------------------------


# -- SIGHUP: new certificates for new connections ---------------------------------


# -- config errors ----------------------------------------------------------------


# -- the development certificate ----------------------------------------------------


def selfsigned(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsgateway.dev.selfsigned", str(folder)], capture_output=True,
                          text=True, env=source_env(), timeout=60)


def test_selfsigned_creates_a_private_key_and_a_certificate_once(tmp_path):
    folder = tmp_path / "var" / "tls"
    made = selfsigned(folder)
    assert made.returncode == 0, made.stderr
    key, cert = folder / "key.pem", folder / "cert.pem"
    assert f"wrote {key}" in made.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert certificate.public_key().public_bytes(*spki) == private.public_key().public_bytes(*spki)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == {"localhost", "127.0.0.1", "::1"}
    assert certificate.issuer == certificate.subject

    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (key, cert)}
    again = selfsigned(folder)
    assert again.returncode == 0 and "kept" in again.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (key, cert)} == before


def test_selfsigned_never_overwrites_half_a_pair(tmp_path):
    folder = tmp_path / "tls"
    folder.mkdir()
    (folder / "key.pem").write_text("an operator's key\n")
    out = selfsigned(folder)
    assert out.returncode == 1
    assert "not overwriting" in out.stderr
    assert (folder / "key.pem").read_text() == "an operator's key\n"
    assert not (folder / "cert.pem").exists()


# -- the listen syntax ----------------------------------------------------------------


def test_parse_listen_follows_twisted_endpoint_syntax():
    assert parse_listen(r"ssl:8443:interface=\:\:1:privateKey=/k\:1.pem:certKey=/c.pem:backlog=10") == SSLListen(
        port=8443, private_key="/k:1.pem", cert="/c.pem", interface="::1", backlog=10)
    # without certKey the privateKey file holds the certificate too (Twisted's convention)
    assert parse_listen("ssl:port=443:privateKey=/both.pem:extraCertChain=/chain.pem") == SSLListen(
        port=443, private_key="/both.pem", cert="/both.pem", extra_chain="/chain.pem")


@pytest.mark.parametrize("desc, problem", [
    ("ssl:8443:privateKey=/k.pem:bogus=1", "unknown ssl: option(s) bogus"),
    ("ssl:8443:8444:privateKey=/k.pem", "give the port once"),
    ("ssl:70000:privateKey=/k.pem", "port must be 0-65535"),
    ("ssl:8443:privateKey=/k.pem:backlog=0", "backlog must be a whole number >= 1"),
    ("ssl:8443:certKey=/c.pem", "ssl needs privateKey=KEY.pem"),
    ("ssl:8443:privateKey=/k.pem:sslmethod=TLSv1_2_METHOD", "sslmethod= is not supported"),
])
def test_parse_listen_rejects(desc, problem):
    with pytest.raises(ValueError) as e:
        parse_listen(desc)
    assert problem in str(e.value)
