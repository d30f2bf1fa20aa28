# -*- test-case-name: tests.integration.test_tls_listen, tests.unit.core.test_tls_listen -*-
"""
A self-signed development certificate for the TLS listener of ``make run``:

    python -m wsgateway.dev.selfsigned DIR

writes DIR/key.pem (mode 0600) and DIR/cert.pem, valid for localhost,
127.0.0.1 and ::1, unless they exist already: it never overwrites anything,
so a key an operator put there is safe. The key is made on the machine that
uses it; no private key is ever committed to the repository.

For development only: browsers warn about such a certificate unless it is
imported as trusted; clients can trust DIR/cert.pem as their CA file.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CERT_NAME", "KEY_NAME", "NAMES", "ensure", "main"]

KEY_NAME = "key.pem"
CERT_NAME = "cert.pem"
NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


def _certificate(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wsgateway development (self-signed)"),
    ])
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in NAMES[1:]]
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # an hour of slack for a client whose clock is a little behind
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # a leaf, not a CA: trusting it as a CA file must not let it sign others
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: fails rather than replace a file that appeared meanwhile
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask says
        os.write(fd, data)
    finally:
        os.close(fd)


def ensure(folder: Path, now: datetime | None = None) -> bool:
    """
    Create folder/key.pem and folder/cert.pem unless both exist.

    @return: True when they were created, False when both were there.
    @raise FileExistsError: when only one of them exists (nothing is touched).
    """
    key_path, cert_path = folder / KEY_NAME, folder / CERT_NAME
    have_key, have_cert = key_path.exists(), cert_path.exists()
    if have_key and have_cert:
        return False
    if have_key or have_cert:
        there, missing = (key_path, cert_path) if have_key else (cert_path, key_path)
        raise FileExistsError(f"{there} exists but {missing} does not; not overwriting anything: "
                              f"remove {there} (or put the matching file beside it) and run again")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(key, now or datetime.now(timezone.utc))
    _write_new(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        key_path.unlink()  # never leave a key without its certificate
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m wsgateway.dev.selfsigned DIR\n\n"
              "Create DIR/key.pem (mode 0600) and DIR/cert.pem, a self-signed development certificate\n"
              f"for {', '.join(NAMES)}, unless they exist.", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    folder = Path(args[0])
    try:
        created = ensure(folder)
    except (OSError, ValueError) as e:
        print(f"wsgateway.dev.selfsigned: {e}", file=sys.stderr)
        return 1
    key_path, cert_path = folder / KEY_NAME, folder / CERT_NAME
    if created:
        print(f"wsgateway.dev.selfsigned: wrote {key_path} (mode 0600) and {cert_path}: a self-signed certificate "
              f"for {', '.join(NAMES)}, valid {VALID_DAYS} days. Development only: browsers will warn; "
              f"clients may trust {cert_path} as their CA file.")
    else:
        print(f"wsgateway.dev.selfsigned: {key_path} and {cert_path} exist, kept as they are.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
