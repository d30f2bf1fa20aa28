# -*- test-case-name: tests.integration.test_tls_listen, tests.unit.core.test_tls_listen -*-
"""
TLS for the client listeners: C{ssl:} entries of C{[gateway] listen}.

Twisted's own C{ssl:} endpoint parser loads the key and certificate once, into
a context nobody can replace, and keeps only the first certificate of
C{certKey}. We build the endpoint ourselves (L{SSL4ServerEndpoint}) around a
L{ReloadableServerTLS}: every new handshake asks it for a connection, it hands
out one made from the I{current} L{CertificateOptions}, and L{reload} swaps
those options. Connections already open keep the C{SSL.Connection} (and
context) they were built with, so renewing a certificate drops no one.

The same loading code checks the files when the config is read (config.py
calls L{check_listen}), so a bad file stops the daemon before it listens, and
a reload that finds a bad file keeps the old certificate and says why.

TLS 1.2 is the minimum on every listener; TLS 1.3 is used when the client
offers it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.ssl import CertificateOptions, DiffieHellmanParameters, TLSVersion
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from wsgateway.config.files import FileRefused, read_bounded
from wsgateway.endpoints import DEFAULT_BACKLOG, split_endpoint

__all__ = [
    "MINIMUM_TLS_VERSION", "ReloadableServerTLS", "SSLListen", "TLSFileError", "check_listen", "is_ssl",
    "describe", "load_options", "parse_listen", "server_service",
]

#: Clients offering only TLS 1.0 or 1.1 are refused (RFC 8996 deprecates both).
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

# The keys of Twisted's ssl: endpoint syntax we honour. sslmethod= is left out
# on purpose: it pins one protocol version and cannot be combined with a minimum.
_KEYS = ("port", "privateKey", "certKey", "interface", "backlog", "extraCertChain", "dhParameters")


class TLSFileError(ValueError):
    """A key, certificate or parameter file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class SSLListen:
    """One parsed C{ssl:} listen entry (paths already absolute: config.py resolves them)."""

    port: int
    private_key: str
    cert: str  # = private_key when certKey= is absent: then that one file holds both (Twisted's convention)
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    extra_chain: str | None = None
    dh_parameters: str | None = None

    @property
    def label(self) -> str:
        """How logs name the listener: C{ssl:8443} or C{ssl:8443:interface=127.0.0.1}."""
        return f"ssl:{self.port}" + (f":interface={self.interface}" if self.interface else "")


def is_ssl(desc: str) -> bool:
    """Is this listen entry an C{ssl:} endpoint string?"""
    return desc.split(":", 1)[0].strip().lower() == "ssl"


def parse_listen(desc: str) -> SSLListen:
    """
    C{ssl:PORT:privateKey=KEY[:certKey=CERT][:interface=IP][:backlog=N][:extraCertChain=PEM][:dhParameters=PEM]}
    (Twisted's endpoint syntax, backslash escapes included) -> L{SSLListen}.

    @raise ValueError: with a message fit for C{[gateway] listen: ...}.
    """
    parts = split_endpoint(desc)
    if parts[0][0] is not None or parts[0][1].lower() != "ssl":
        raise ValueError("not an ssl: endpoint")
    positional = [value for key, value in parts[1:] if key is None]
    kw = {key: value for key, value in parts[1:] if key is not None}
    if "sslmethod" in kw:
        raise ValueError("sslmethod= is not supported: TLS 1.2 is the minimum, TLS 1.3 is used when the client offers it")
    unknown = sorted(set(kw) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown ssl: option(s) {', '.join(unknown)} (known: {', '.join(_KEYS)})")
    if len(positional) > 1 or (positional and "port" in kw):
        raise ValueError("give the port once, and every other option as key=value")
    port_text = kw.get("port", positional[0] if positional else "")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError("port must be 0-65535")
    backlog = kw.get("backlog", str(DEFAULT_BACKLOG))
    if not backlog.isdigit() or int(backlog) < 1:
        raise ValueError("backlog must be a whole number >= 1")
    private_key = kw.get("privateKey", "")
    if not private_key:
        raise ValueError("ssl needs privateKey=KEY.pem (and certKey=CERT.pem)")
    return SSLListen(
        port=int(port_text),
        private_key=private_key,
        cert=kw.get("certKey") or private_key,
        interface=kw.get("interface", ""),
        backlog=int(backlog),
        extra_chain=kw.get("extraCertChain") or None,
        dh_parameters=kw.get("dhParameters") or None,
    )


# ------------------------------------------------------------ loading files


def _read(path: str, option: str, private: bool = False) -> bytes:
    # bounded and regular files only (docs/configuration.md): at start, in wsgateway-check and on SIGHUP alike
    try:
        return read_bounded(path, private=private)
    except FileRefused as e:
        raise TLSFileError(f"{option} {e}") from None
    except OSError as e:
        raise TLSFileError(f"{option} {path}: cannot read: {e.strerror or e}") from None


def _certificates(path: str, option: str) -> list[x509.Certificate]:
    data = _read(path, option)
    try:
        # every CERTIFICATE block in the file, in order; other blocks (a key) are skipped
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSFileError(f"{option} {path}: no valid PEM certificate in it") from None


def _private_key(path: str, option: str) -> Any:
    data = _read(path, option, private=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography says "Password was not given but private key is encrypted"
        raise TLSFileError(f"{option} {path}: the key is encrypted; wsgateway needs an unencrypted PEM key "
                           "(keep it readable by the gateway's user only)") from None
    except (ValueError, crypto.Error):
        raise TLSFileError(f"{option} {path}: no valid unencrypted PEM private key in it") from None


def load_options(listen: SSLListen) -> tuple[CertificateOptions, x509.Certificate]:
    """
    Read the listener's files -> (ready server options, the leaf certificate).

    C{certKey} may hold the leaf followed by its chain (a "fullchain.pem");
    C{extraCertChain} adds more chain certificates after those.

    @raise TLSFileError: naming the file and what is wrong with it.
    """
    key_option = "privateKey"
    cert_option = "certKey" if listen.cert != listen.private_key else "privateKey"
    problems: list[str] = []  # every file's problem at once, not just the first

    def attempt(load: Any, *args: Any) -> Any:
        try:
            return load(*args)
        except TLSFileError as e:
            problems.append(str(e))
            return None

    key = attempt(_private_key, listen.private_key, key_option)
    certs = attempt(_certificates, listen.cert, cert_option)
    extra = attempt(_certificates, listen.extra_chain, "extraCertChain") if listen.extra_chain else []
    if listen.dh_parameters:
        attempt(_read, listen.dh_parameters, "dhParameters")
    if problems:
        # one file as privateKey and certificate: its one problem, once
        raise TLSFileError("; ".join(dict.fromkeys(problems)))
    leaf, *chain = certs
    chain += extra
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TLSFileError(f"{key_option} {listen.private_key}: does not match the (first) certificate in "
                           f"{cert_option} {listen.cert}; give the key that belongs to that certificate")
    dh = DiffieHellmanParameters.fromFile(FilePath(listen.dh_parameters)) if listen.dh_parameters else None
    try:
        options = _certificate_options(key, leaf, chain, dh)
    except (SSL.Error, crypto.Error, ValueError, TypeError) as e:
        files = ", ".join(dict.fromkeys(f for f in (listen.private_key, listen.cert, listen.extra_chain,
                                                    listen.dh_parameters) if f))
        raise TLSFileError(f"OpenSSL cannot use {files}: {e}") from None
    return options, leaf


def _certificate_options(key: Any, leaf: x509.Certificate, chain: list[x509.Certificate],
                         dh: Any) -> CertificateOptions:
    # ALPN: browsers and curl offer it (a browser's wss:// offers http/1.1). Twisted
    # (26.10) answers every offer, and with no protocol of ours it fails the
    # handshake with an "internal error" alert: name the one we speak.
    common: dict[str, Any] = {"dhParameters": dh, "raiseMinimumTo": MINIMUM_TLS_VERSION,
                              "acceptableProtocols": [b"http/1.1"]}
    try:
        # Recent pyOpenSSL takes cryptography's objects (and deprecates its own wrappers) ...
        # Twisted's hints still name pyOpenSSL's X509 for both arguments: they lag the code.
        options = CertificateOptions(privateKey=key, certificate=leaf,  # type: ignore[arg-type]
                                     extraCertChain=chain or None, **common)  # type: ignore[arg-type]
        # Build the OpenSSL context now: OpenSSL's own checks (key type, DH
        # parameters) then fail here, at start or reload, not on the next handshake.
        options.getContext()
    except TypeError:
        # ... older ones (setup.cfg allows >= 24.0) only take the wrappers.
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain] or None,
            **common,
        )
        options.getContext()
    return options


def check_listen(desc: str) -> None:
    """
    Config-time check of one C{ssl:} entry (paths absolute): parse it and load
    its files exactly as the daemon will, without binding anything.

    @raise ValueError: (or L{TLSFileError}) with a message naming the file.
    """
    load_options(parse_listen(desc))


def describe(cert: x509.Certificate) -> str:
    """Subject names, expiry and fingerprint: enough for an operator to tell two certificates apart."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        shown = ", ".join(str(n.value) for n in names)
    except x509.ExtensionNotFound:
        shown = ", ".join(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
    return f"{shown or cert.subject.rfc4514_string()} (valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, " \
           f"SHA-256 {fingerprint}...)"


# ---------------------------------------------------------- the listener


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The server connection creator of one C{ssl:} listener, whose certificate
    can be replaced while it listens. (Twisted's TLS wrapper calls
    L{serverConnectionForTLS} once per accepted connection.)
    """

    log = Logger()

    def __init__(self, listen: SSLListen, clock: Any) -> None:  # IReactorTime
        self.listen = listen
        self._clock = clock
        # At start the files were checked moments ago by config.py: a failure
        # here is a real error and must stop the daemon, so it is not caught.
        self._options, self.certificate = load_options(listen)
        self._announce("serving")

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # The options of this moment; the connection keeps them for its whole life.
        return self._options.serverConnectionForTLS(tlsProtocol)

    def reload(self) -> bool:
        """
        Re-read the key and certificate files; new connections get the new
        certificate, open ones keep theirs. On any problem the old certificate
        stays and the error is logged: a reload never stops the daemon.
        """
        try:
            options, cert = load_options(self.listen)
        except TLSFileError as e:
            self.log.error(
                "TLS reload of {listener} failed, still serving the previous certificate: {problem}. "
                "Fix the file, then send SIGHUP again",
                listener=self.listen.label, problem=str(e),
            )
            return False
        except Exception:
            self.log.failure("TLS reload of {listener} failed, still serving the previous certificate",
                             listener=self.listen.label)
            return False
        changed = cert != self.certificate
        self._options, self.certificate = options, cert
        self._announce("reloaded, now serving" if changed else "reloaded, unchanged:")
        return True

    def _announce(self, what: str) -> None:
        self.log.info("TLS {listener} {what} {certificate}", listener=self.listen.label, what=what,
                      certificate=describe(self.certificate))
        now = datetime.fromtimestamp(self._clock.seconds(), timezone.utc)
        if now > self.certificate.not_valid_after_utc:
            self.log.warn("TLS {listener}: the certificate EXPIRED on {when:%Y-%m-%d}; clients will refuse it",
                          listener=self.listen.label, when=self.certificate.not_valid_after_utc)
        elif now < self.certificate.not_valid_before_utc:
            self.log.warn("TLS {listener}: the certificate is not valid before {when:%Y-%m-%d %H:%M} UTC",
                          listener=self.listen.label, when=self.certificate.not_valid_before_utc)


def server_service(desc: str, factory: IProtocolFactory, reactor: Any) -> tuple[StreamServerEndpointService,
                                                                                ReloadableServerTLS]:
    """
    The service that listens on one C{ssl:} entry, and its reloadable TLS.

    Like C{strports.service}, a port that cannot be bound aborts the start
    instead of only being logged.
    """
    listen = parse_listen(desc)
    tls = ReloadableServerTLS(listen, reactor)
    endpoint = SSL4ServerEndpoint(reactor, listen.port, tls, backlog=listen.backlog, interface=listen.interface)
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service, tls


def trust_root(ca_path: str | None) -> Any:
    """
    The certificates of a PEM bundle (a ``tls_ca`` or ``jwks_ca``) as a
    trust root for ``optionsForClientTLS``; None = the platform's store.
    """
    if not ca_path:
        return None
    with open(ca_path, "rb") as f:
        pem = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(marker + part) for part in pem.split(marker)[1:]]
    return ssl.trustRootFromCertificates(certs)
