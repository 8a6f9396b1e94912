"""Local delivery into Maildirs (tmp/ then rename into new/), one per recipient.

The file name is derived from the queue entry (arrival time, queue id,
recipient index), not from the moment of delivery, so a delivery repeated
after a crash between the rename and the spool's record of it finds its own
earlier file and does not deliver twice. Files use LF line endings, as
Postfix's local(8) writes them, and start with Return-Path: and Delivered-To:.
A Maildir that cannot be written is a transient failure: the operator can
fix permissions and the mail waits in the queue.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import DeliveryResult, IDeliverer
from relaygw.spool import BlockingRunner, MessageSource, QueueFiles

CHUNK = 256 * 1024


def maildir_file_name(envelope: Envelope, index: int, hostname: str) -> str:
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{int(envelope.received)}.R{envelope.id}_{index}.{host}"


@implementer(IDeliverer)
class MaildirDeliverer:
    def __init__(self, hostname: str, run_blocking: BlockingRunner,
                 source: MessageSource | None = None) -> None:
        self.hostname = hostname
        self.run_blocking = run_blocking
        self.source: MessageSource = source if source is not None else QueueFiles()

    def destination(self, recipient: Recipient) -> str:
        return "local"

    def deliver(self, envelope: Envelope, message_path: Path,
                recipients: Sequence[Recipient]) -> Deferred[list[DeliveryResult]]:
        d = self.run_blocking(self._deliver_all, envelope, message_path, list(recipients))
        return d.addErrback(lambda f: [DeliveryResult.deferred(
            f"451 4.3.0 local delivery failed: {f.getErrorMessage()}")] * len(recipients))

    def _deliver_all(self, envelope: Envelope, message_path: Path,
                     recipients: list[Recipient]) -> list[DeliveryResult]:
        results = []
        for recipient in recipients:
            try:
                index = envelope.recipients.index(recipient)
                path = self._deliver_one(envelope, message_path, recipient, index)
            except OSError as e:
                results.append(DeliveryResult.deferred(
                    f"451 4.3.0 cannot write Maildir {recipient.maildir}: "
                    f"{e.strerror or e}"))
            else:
                results.append(DeliveryResult.delivered(
                    f"250 2.0.0 delivered to maildir {path}"))
        return results

    def _deliver_one(self, envelope: Envelope, message_path: Path, recipient: Recipient,
                     index: int) -> str:
        assert recipient.maildir is not None
        maildir = Path(recipient.maildir)
        name = maildir_file_name(envelope, index, self.hostname)
        final = maildir / "new" / name
        if final.exists() or (maildir / "cur" / f"{name}:2,").exists():
            return str(final)  # delivered before a crash; the spool did not hear of it
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = maildir / "tmp" / name
        header = (f"Return-Path: <{envelope.sender}>\n"
                  # lowercased, as Postfix's mail_copy writes it (and as the path is)
                  f"Delivered-To: {recipient.address.lower()}\n").encode()
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with (open(fd, "wb", closefd=False) as out,
                  self.source.open_for_delivery(envelope, message_path) as source):
                out.write(header)
                carry = b""
                for chunk in without_return_path(iter(lambda: source.read(CHUNK), b"")):
                    chunk = carry + chunk
                    if chunk.endswith(b"\r"):  # a CRLF split across two reads
                        chunk, carry = chunk[:-1], b"\r"
                    else:
                        carry = b""
                    out.write(chunk.replace(b"\r\n", b"\n"))
                out.write(carry)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(temp, final)
        dir_fd = os.open(maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return str(final)


HEADER_SCAN_LIMIT = 256 * 1024  # a "line" this long ends the scan (DATA caps lines at 1000)


def without_return_path(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The message's chunks, less any ``Return-Path:`` field of its header
    section (folded lines included): the one written at delivery is the only
    true one, and a client's own would sit under it, as Postfix's cleanup
    drops it. The body passes as it is (and all that follows a line past
    HEADER_SCAN_LIMIT, which no message accepted by DATA has)."""
    pending = b""
    dropping = False
    for chunk in chunks:
        pending += chunk
        kept = []
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            line = pending[start:end + 1]
            start = end + 1
            if line in (b"\r\n", b"\n") or not (line[:1] in (b" ", b"\t") or b":" in line):
                kept.append(line)  # the end of the header section
                kept.append(pending[start:])
                yield b"".join(kept)
                yield from chunks
                return
            if line[:1] in (b" ", b"\t"):
                if not dropping:
                    kept.append(line)
                continue
            dropping = line[:12].lower() == b"return-path:"
            if not dropping:
                kept.append(line)
        pending = pending[start:]
        if kept:
            yield b"".join(kept)
        if len(pending) > HEADER_SCAN_LIMIT:
            yield pending
            yield from chunks
            return
    if pending:
        yield pending
