"""Outbound TLS for real, over loopback: STARTTLS, certificate checks, AUTH inside TLS.

A throw-away CA and server certificate are made at test time with
``cryptography``; the fake server (from test_smtp_client) listens on
127.0.0.1 port 0, and every test waits for both ends of each connection to
close, so the reactor is left clean.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from relaygw.config import parse_config
from relaygw.delivery.smtp import SMTPRelayDeliverer
from relaygw.delivery.smtpclient import SMTPClientFactory, SMTPClientProtocol
from relaygw.dns import Answer, Hop, NextHopResolver
from relaygw.interfaces import DeliveryResult, Status
from test_smtp_client import FakeLookup, FakeSMTPFactory, Script, envelope


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(hostname: str) -> tuple[bytes, bytes]:
    """(CA certificate PEM, server certificate + key PEM) for ``hostname``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("relaygw test CA")).issuer_name(_name("relaygw test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hostname)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    server_pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    return ca_cert.public_bytes(serialization.Encoding.PEM), server_pem


class RelayTLSTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relaygw-tls-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        ca_pem, server_pem = make_ca_and_server_cert("mx.example.test")
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(ca_pem)
        self.server_options = ssl.PrivateCertificate.loadPEM(server_pem).options()
        self.message = self.dir / "message"
        self.message.write_bytes(b"Subject: tls\r\n\r\nover TLS\r\n")
        self.clients: list[SMTPClientProtocol] = []

    def listen(self, script: Script) -> tuple[FakeSMTPFactory, int]:
        factory = FakeSMTPFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def deliverer(self, route: str, port: int) -> SMTPRelayDeliverer:
        cfg = parse_config(f"""
[server]
hostname = "relay.example.test"
[[listener]]
endpoint = "tcp:2525"
[relay]
mx_port = {port}
{route}
""")
        resolver = NextHopResolver(FakeLookup({
            ("example.test", "MX"): Answer(((10, "mx.example.test"),), 60),
            ("wrong.test", "MX"): Answer(((10, "mx.wrong.test"),), 60),
            ("mx.example.test", "A"): Answer(("127.0.0.1",), 60),
            ("mx.wrong.test", "A"): Answer(("127.0.0.1",), 60),
        }))

        def connect(hop: Hop) -> Deferred[SMTPClientProtocol]:
            endpoint = TCP4ClientEndpoint(reactor, hop.address, hop.port, timeout=5)
            d = endpoint.connect(SMTPClientFactory(reactor))
            d.addCallback(lambda proto: self.clients.append(proto) or proto)
            return d

        return SMTPRelayDeliverer(cfg, reactor, resolver, connect=connect)

    async def deliver(self, deliverer: SMTPRelayDeliverer, factory: FakeSMTPFactory,
                      address: str) -> list[DeliveryResult]:
        env = envelope(address, size=self.message.stat().st_size)
        results = await deliverer.deliver(env, self.message, env.recipients)
        # Both ends of every connection must be gone before the test ends.
        await gatherResults([s.closed for s in factory.servers]
                            + [c.closed for c in self.clients])
        return results

    async def test_verify_delivers_to_the_right_name(self) -> None:
        factory, port = self.listen(Script(tls_options=self.server_options))
        deliverer = self.deliverer(f"""
[[route]]
domains = ["*"]
action = "relay"
tls = "verify"
ca_file = "{self.ca_file}"
""", port)
        results = await self.deliver(deliverer, factory, "bob@example.test")
        self.assertEqual(results, [DeliveryResult.delivered(
            "250 2.0.0 Ok: queued as ABC", f"mx.example.test[127.0.0.1]:{port}")])
        server = factory.servers[0]
        self.assertTrue(server.tls)
        self.assertEqual(server.commands[:3], ["EHLO relay.example.test", "STARTTLS",
                                               "EHLO relay.example.test"])
        self.assertEqual(server.messages, [b"Subject: tls\r\n\r\nover TLS\r\n.\r\n"])

    async def test_verify_defers_on_a_name_mismatch(self) -> None:
        factory, port = self.listen(Script(tls_options=self.server_options))
        deliverer = self.deliverer(f"""
[[route]]
domains = ["*"]
action = "relay"
tls = "verify"
ca_file = "{self.ca_file}"
""", port)
        results = await self.deliver(deliverer, factory, "bob@wrong.test")
        self.assertEqual(results[0].status, Status.DEFERRED, results[0].reply)
        self.assertIn("4.7.5 TLS negotiation with mx.wrong.test", results[0].reply)
        self.assertIn("DNSMismatch", results[0].reply)  # service-identity's verdict
        self.assertEqual(factory.servers[0].messages, [])
        self.assertNotIn("MAIL", " ".join(factory.servers[0].commands))

    async def test_verify_defers_on_an_unknown_ca(self) -> None:
        factory, port = self.listen(Script(tls_options=self.server_options))
        deliverer = self.deliverer("""
[[route]]
domains = ["*"]
action = "relay"
tls = "verify"
""", port)  # no ca_file: the platform's store, which does not know our test CA
        results = await self.deliver(deliverer, factory, "bob@example.test")
        self.assertEqual(results[0].status, Status.DEFERRED, results[0].reply)
        self.assertIn("4.7.5", results[0].reply)
        self.assertIn("certificate verify failed", results[0].reply)
        self.assertEqual(factory.servers[0].messages, [])

    async def test_opportunistic_encrypts_without_checking_and_auths_inside_tls(self) -> None:
        secret = self.dir / "secret"
        secret.write_text("pw\n")
        factory, port = self.listen(Script(tls_options=self.server_options,
                                           users={"relay": "pw"}))
        deliverer = self.deliverer(f"""
[[route]]
domains = ["*"]
action = "relay"
via = "127.0.0.1:{port}"
tls = "opportunistic"
username = "relay"
password_file = "{secret}"
""", port)
        results = await self.deliver(deliverer, factory, "bob@wrong.test")
        self.assertEqual(results[0].status, Status.DELIVERED)
        server = factory.servers[0]
        self.assertTrue(server.tls)
        self.assertEqual(server.authenticated, "relay")
        self.assertTrue(server.commands[3].startswith("AUTH PLAIN "))
