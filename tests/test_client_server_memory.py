"""Our relay client against our own SMTP server, in memory (iosim).

The outbound half of one relaygw talks to the inbound half of another: what
leaves the spool on one side must arrive in the other's spool byte for byte,
dot-stuffing undone, with per-recipient answers honoured.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump

from relaygw.delivery.smtp import SMTPRelayDeliverer
from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import Status
from relaygw.smtpserver import SMTPFactory
from support import FakeGateway, make_gateway
from test_smtp_client import MX_PORT, config, result_of, two_mx_resolver


class Link:
    """Client deliverer and server gateway joined by in-memory TCP."""

    def __init__(self, tmp_path: Path) -> None:
        self.reactor = MemoryReactorClock()
        self.gateway: FakeGateway = make_gateway(tmp_path / "server")
        self.reactor.listenTCP(MX_PORT, SMTPFactory(self.gateway, "smtp", "memory"))
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []
        self.deliverer = SMTPRelayDeliverer(config(), self.reactor, two_mx_resolver())

    def run(self) -> None:
        while True:
            self.reactor.advance(0)
            moved = False
            while self.reactor.tcpClients:
                pump = self.completer.succeedOnce()
                assert pump is not None
                self.pumps.append(pump)
                moved = True
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return


def send(tmp_path: Path, content: bytes, *addresses: str) -> tuple[Link, list[Status]]:
    link = Link(tmp_path)
    path = tmp_path / "outgoing.msg"
    path.write_bytes(content)
    envelope = Envelope(id="OUT1", sender="alice@origin.test", received=0.0, recipients=[
        Recipient(address=a, original=a, action="relay") for a in addresses], size=len(content))
    d = link.deliverer.deliver(envelope, path, envelope.recipients)
    link.run()
    return link, [r.status for r in result_of(d)]


TRICKY = (b"Subject: dots and lengths\r\n\r\n"
          b".\r\n"
          b"..two\r\n"
          b".leading\r\n"
          b"\r\n.\r\n"
          + b"x" * 998 + b"\r\n"
          + "caf\u00e9 8-bit\r\n".encode())


def test_message_arrives_byte_for_byte(tmp_path: Path) -> None:
    link, statuses = send(tmp_path, TRICKY, "alice@example.test")
    assert statuses == [Status.DELIVERED]
    [queue_id] = link.gateway.queued_ids()
    assert link.gateway.body(queue_id) == TRICKY
    [envelope] = link.gateway.accepted_envelopes
    assert envelope.sender == "alice@origin.test"
    assert [r.address for r in envelope.recipients] == ["alice@example.test"]


def test_missing_final_crlf_is_added(tmp_path: Path) -> None:
    link, statuses = send(tmp_path, b"Subject: x\r\n\r\nno line end", "alice@example.test")
    assert statuses == [Status.DELIVERED]
    [queue_id] = link.gateway.queued_ids()
    assert link.gateway.body(queue_id) == b"Subject: x\r\n\r\nno line end\r\n"


def test_one_transaction_per_recipient_answer(tmp_path: Path) -> None:
    link, statuses = send(tmp_path, b"Subject: many\r\n\r\nhi\r\n",
                          "alice@example.test", "nobody@example.test", "bob@example.test")
    # our server refuses the unknown mailbox at RCPT (550 5.1.1): that one fails,
    # the other two go in the same single transaction
    assert statuses == [Status.DELIVERED, Status.FAILED, Status.DELIVERED]
    [envelope] = link.gateway.accepted_envelopes
    assert [r.address for r in envelope.recipients] == ["alice@example.test",
                                                        "bob@example.test"]
