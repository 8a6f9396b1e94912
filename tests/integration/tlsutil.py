"""A throwaway test CA, made with ``cryptography``, issuing server certificates for sinks."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class IssuedCert:
    certificate: Path  # PEM certificate (leaf only)
    private_key: Path  # PEM PKCS#8 key
    chain: Path        # leaf + CA, for servers that want the chain in one file

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.chain), str(self.private_key))
        return ctx


class TestCA:
    """A CA whose certificate is written to ``directory/ca.pem``."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "relaygw test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_pem = directory / "ca.pem"
        self.ca_pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, names: list[str], ips: list[str] | None = None,
              stem: str | None = None) -> IssuedCert:
        """A server certificate for DNS ``names`` and IP ``ips``, signed by this CA."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        names[0] if names else "server")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        stem = stem or (names[0] if names else (ips or ["server"])[0])
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        chain_path = self.directory / f"{stem}.chain.pem"
        leaf = cert.public_bytes(serialization.Encoding.PEM)
        cert_path.write_bytes(leaf)
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        chain_path.write_bytes(leaf + self.cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCert(certificate=cert_path, private_key=key_path, chain=chain_path)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA, with hostname checks."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        return ctx
