"""Inbound TLS: the server context from ``[tls]``, reloadable without a restart.

One ``ServerTLS`` per gateway serves both STARTTLS (``transport.startTLS``)
and the implicit-TLS listeners (``TLSMemoryBIOFactory``). It is an
``IOpenSSLServerConnectionCreator``: every new TLS connection asks it for a
connection, so after ``load()`` has read a renewed certificate the next
session uses it while sessions in flight keep theirs.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL.SSL import Connection, Context
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from relaygw.config import TLSConfig

# TLS 1.2 with forward secrecy and AEAD only; TLS 1.3 suites are not chosen by this string.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS")


class TLSLoadError(Exception):
    """Certificate or key unusable, phrased as one line naming the file."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSLoadError(f"[tls] {what}: {path}: cannot read: {e.strerror or e}") from None


def load_options(config: TLSConfig) -> CertificateOptions:
    """CertificateOptions from the PEM files; the certificate file may hold the chain."""
    cert_pem = _read(config.certificate, "certificate")
    key_pem = _read(config.private_key, "private_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise TLSLoadError(f"[tls] certificate: {config.certificate}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSLoadError(f"[tls] private_key: {config.private_key}: {e}") from None
    options = CertificateOptions(
        # pyOpenSSL takes the cryptography objects themselves (its own are deprecated)
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=CIPHERS,
    )
    try:
        options.getContext().check_privatekey()  # built now: a mismatch fails at load
    except Exception as e:
        raise TLSLoadError(f"[tls] private_key: {config.private_key}: does not match "
                           f"the certificate {config.certificate} ({e})") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The current server context; ``load()`` (start-up, SIGHUP) replaces it."""

    log = Logger()

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self.options: CertificateOptions | None = None

    def load(self) -> None:
        """Read certificate and key; on TLSLoadError the previous context stays."""
        self.options = load_options(self.config)
        self.log.info("tls: certificate {certificate} loaded",
                      certificate=str(self.config.certificate))

    def context(self) -> Context:
        if self.options is None:
            raise TLSLoadError("[tls]: certificate not loaded")
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        return Connection(self.context(), None)


def implicit_tls_factory(tls: ServerTLS, factory: Factory,
                         clock: IReactorTime | None = None) -> TLSMemoryBIOFactory:
    """``factory`` behind TLS from the first byte (RFC 8314 ``submissions``).

    ``clock`` schedules the flush of small writes aggregated into one TLS record.
    """
    return TLSMemoryBIOFactory(tls, False, factory, clock)
