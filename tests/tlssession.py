"""A real TLS handshake in memory, for the inbound STARTTLS and implicit-TLS tests.

``TLSCapableTransport`` is a StringTransport whose ``startTLS`` is the real thing:
from then on the server's writes are encrypted by a TLSMemoryBIOProtocol and what
the client sends is decrypted before the SMTP protocol sees it (what Twisted's TCP
transport does). ``TLSSession`` is the client: plain bytes first, then the
standard library's ``ssl.SSLObject`` over memory BIOs, checking the server's
certificate against a test CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from relaygw.smtpserver import SMTPServerProtocol
from support import TRUSTED_PEER, FakeGateway, split_replies


class TLSCapableTransport(StringTransport):
    """Clear text until ``startTLS``; then TLS for real, ciphertext in ``value()``."""

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.tls: TLSMemoryBIOProtocol | None = None
        self.raw = StringTransport(peerAddress=peer)
        self.raw.io = self.io  # the TLS layer writes its records where we write

    def startTLS(self, creator: Any, normal: bool = True) -> None:
        assert self.tls is None, "startTLS twice"
        factory = TLSMemoryBIOFactory(creator, False, None)
        # unbuffered: BufferingTLSTransport would hold writes for a reactor turn
        self.tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.tls.makeConnection(self.raw)

    def write(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
        else:
            super().write(data)

    def receive(self, data: bytes) -> None:
        """Bytes from the client, as the reactor would deliver them."""
        if self.tls is not None:
            self.tls.dataReceived(data)
        else:
            self.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        return bool(self.disconnecting or self.raw.disconnecting)


class TLSSession:
    """One client: ``send`` in clear text, ``starttls()``, then ``send`` inside TLS."""

    def __init__(self, gateway: FakeGateway, ca_file: Path, *, peer: IPv4Address = TRUSTED_PEER,
                 kind: str = "smtp", server_name: str = "relay.example.test") -> None:
        self.transport = TLSCapableTransport(peer)
        self.protocol = SMTPServerProtocol(gateway, kind, "test")
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_name = server_name
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self._seen = 0
        self._plain = b""

    def _take(self) -> bytes:
        value = self.transport.value()
        fresh, self._seen = value[self._seen:], len(value)
        return fresh

    def banner(self) -> list[str]:
        return split_replies(self._take())

    def send(self, data: bytes | str) -> list[str]:
        """Feed ``data`` in one piece; the reply lines the server wrote since."""
        if isinstance(data, str):
            data = data.encode()
        if self.tls is None:
            self.transport.receive(data)
            return split_replies(self._take())
        self.tls.write(data)
        self._flush_out()
        return split_replies(self._read_tls())

    def send_raw(self, data: bytes) -> None:
        """Clear-text bytes straight onto the wire, whatever the TLS state."""
        self.transport.receive(data)

    def _flush_out(self) -> None:
        out = self.outgoing.read()
        if out:
            self.transport.receive(out)

    def _read_tls(self) -> bytes:
        assert self.tls is not None
        self.incoming.write(self._take())
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._flush_out()  # e.g. a key update answered
        return b"".join(chunks)

    def handshake(self) -> ssl.SSLObject:
        """The TLS handshake with the server, certificate checked."""
        self.tls = self.context.wrap_bio(self.incoming, self.outgoing,
                                         server_hostname=self.server_name)
        for _ in range(20):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            self._flush_out()
            self.incoming.write(self._take())
        else:
            raise AssertionError("TLS handshake did not complete")
        self._flush_out()
        return self.tls

    def starttls(self) -> list[str]:
        lines = self.send("STARTTLS\r\n")
        assert lines == ["220 2.0.0 Ready to start TLS"], lines
        self.handshake()
        return lines
