"""Local delivery into Maildirs: headers added, LF endings, idempotent, failures defer."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from core_fakes import recipient, sync_run
from relaygw.delivery.maildir import (
    CHUNK,
    MaildirDeliverer,
    maildir_file_name,
    without_return_path,
)
from relaygw.envelope import Envelope
from relaygw.interfaces import DeliveryResult, IDeliverer, Status

MESSAGE = b"Received: from c.test\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"


def deliver(envelope: Envelope, message: Path, rcpts: list | None = None,
            hostname: str = "mx.example.test") -> list[DeliveryResult]:
    deliverer = MaildirDeliverer(hostname, sync_run)
    d: Deferred[list[DeliveryResult]] = deliverer.deliver(
        envelope, message, envelope.recipients if rcpts is None else rcpts)
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "a synchronous runner answers at once"
    assert isinstance(results[0], list)
    return results[0]


def setup(tmp_path: Path, data: bytes = MESSAGE, sender: str = "s@src.test",
          count: int = 1) -> tuple[Envelope, Path]:
    message = tmp_path / "0000000000001000ABC.msg"
    message.write_bytes(data + b"\n{the envelope trailer, never delivered}\n")
    rcpts = [recipient(f"user{i}@example.test", action="local",
                       maildir=str(tmp_path / "mail" / f"user{i}")) for i in range(count)]
    envelope = Envelope(id="0000000000001000ABC", sender=sender, recipients=rcpts,
                        received=1700000000.5, size=len(data))
    return envelope, message


def files(maildir: Path, sub: str = "new") -> list[Path]:
    return sorted((maildir / sub).iterdir())


def test_provides_the_interface() -> None:
    deliverer = MaildirDeliverer("mx.test", sync_run)
    assert IDeliverer.providedBy(deliverer)
    assert deliverer.destination(recipient("a@b.test", action="local")) == "local"


def test_delivery_lands_in_new_with_headers_first_and_lf(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path)
    [result] = deliver(envelope, message)
    assert result.status is Status.DELIVERED
    assert result.reply.startswith("250 2.0.0")
    maildir = tmp_path / "mail" / "user0"
    [delivered] = files(maildir)
    assert files(maildir, "tmp") == [] and files(maildir, "cur") == []
    assert delivered.name == maildir_file_name(envelope, 0, "mx.example.test")
    assert delivered.read_bytes() == (
        b"Return-Path: <s@src.test>\nDelivered-To: user0@example.test\n"
        + MESSAGE.replace(b"\r\n", b"\n"))
    assert os.stat(delivered).st_mode & 0o777 == 0o600


def test_null_sender_gets_an_empty_return_path(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, sender="")
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    assert delivered.read_bytes().startswith(b"Return-Path: <>\n")


def test_each_recipient_gets_its_own_copy(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, count=3)
    results = deliver(envelope, message)
    assert [r.status for r in results] == [Status.DELIVERED] * 3
    for i in range(3):
        [delivered] = files(tmp_path / "mail" / f"user{i}")
        assert f"Delivered-To: user{i}@example.test\n".encode() in delivered.read_bytes()


def test_crlf_split_across_the_read_boundary(tmp_path: Path) -> None:
    head = b"Subject: big\r\n\r\n"
    filler = b"x" * (CHUNK - 1 - len(head))
    data = head + filler + b"\r\n" + b"after the boundary\r\n" + b"y" * 1000 + b"\r\n"
    assert data[CHUNK - 1:CHUNK + 1] == b"\r\n"  # the CRLF straddles two reads
    assert len(data) > CHUNK
    envelope, message = setup(tmp_path, data)
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    body = delivered.read_bytes().split(b"\n", 2)[2]
    assert body == data.replace(b"\r\n", b"\n")
    assert b"\r" not in body


def test_bare_cr_at_the_boundary_and_at_the_end_is_kept(tmp_path: Path) -> None:
    head = b"Subject: cr\r\n\r\n"
    data = head + b"x" * (CHUNK - 1 - len(head)) + b"\rnot a line end\r\nend\r"
    assert data[CHUNK - 1:CHUNK] == b"\r"
    envelope, message = setup(tmp_path, data)
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    assert delivered.read_bytes().split(b"\n", 2)[2] == data.replace(b"\r\n", b"\n")


def test_several_chunks(tmp_path: Path) -> None:
    line = b"z" * 76 + b"\r\n"
    data = b"Subject: huge\r\n\r\n" + line * ((3 * CHUNK) // len(line) + 7)
    envelope, message = setup(tmp_path, data)
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    assert delivered.read_bytes().split(b"\n", 2)[2] == data.replace(b"\r\n", b"\n")


def test_repeated_delivery_does_not_make_a_second_copy(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path)
    first = deliver(envelope, message)
    second = deliver(envelope, message)
    assert [r.status for r in first + second] == [Status.DELIVERED] * 2
    maildir = tmp_path / "mail" / "user0"
    assert len(files(maildir)) == 1
    # the user's reader moved it to cur/: still not delivered again
    [delivered] = files(maildir)
    delivered.rename(maildir / "cur" / f"{delivered.name}:2,")
    assert deliver(envelope, message)[0].status is Status.DELIVERED
    assert files(maildir) == []
    assert len(files(maildir, "cur")) == 1


def test_same_envelope_different_recipients_do_not_collide(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, count=2)
    shared = str(tmp_path / "mail" / "shared")
    for rcpt in envelope.recipients:
        rcpt.maildir = shared
    deliver(envelope, message)
    assert len(files(Path(shared))) == 2


def test_unwritable_maildir_defers(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, count=2)
    blocked = tmp_path / "mail" / "user0"
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"a regular file where the Maildir should be")
    results = deliver(envelope, message)
    assert results[0].status is Status.DEFERRED
    assert results[0].reply.startswith("451 4.3.0")
    assert str(blocked) in results[0].reply
    assert results[1].status is Status.DELIVERED  # the other recipient is not held back
    assert blocked.read_bytes().startswith(b"a regular file")


def test_missing_message_file_defers_every_recipient(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, count=2)
    message.unlink()
    results = deliver(envelope, message)
    assert [r.status for r in results] == [Status.DEFERRED] * 2
    for i in range(2):
        assert files(tmp_path / "mail" / f"user{i}", "tmp") == []


def test_a_runner_that_fails_defers_every_recipient(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path, count=2)

    def broken_runner(fn: object, *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        d.errback(RuntimeError("thread pool gone"))
        return d

    d = MaildirDeliverer("mx.test", broken_runner).deliver(envelope, message,
                                                           envelope.recipients)
    results: list[list[DeliveryResult]] = []
    d.addCallback(results.append)
    assert [r.status for r in results[0]] == [Status.DEFERRED] * 2
    assert "thread pool gone" in results[0][0].reply


def test_file_name_is_safe(tmp_path: Path) -> None:
    envelope, _ = setup(tmp_path)
    name = maildir_file_name(envelope, 3, "odd/host:name")
    assert "/" not in name and ":" not in name
    assert name.startswith("1700000000.R0000000000001000ABC_3.")


def test_a_return_path_the_client_wrote_is_dropped(tmp_path: Path) -> None:
    """Only the one written at delivery stays (Postfix's cleanup drops the client's)."""
    data = (b"Received: from c.test\r\nReturn-Path: <forged@evil.test>\r\n"
            b"RETURN-PATH:\r\n <folded@evil.test>\r\nSubject: hi\r\n\r\n"
            b"Return-Path: <in the body, kept>\r\n")
    envelope, message = setup(tmp_path, data)
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    assert delivered.read_bytes() == (
        b"Return-Path: <s@src.test>\nDelivered-To: user0@example.test\n"
        b"Received: from c.test\nSubject: hi\n\nReturn-Path: <in the body, kept>\n")


HEADER_LINES = st.sampled_from([
    b"Subject: hi\r\n", b"Return-Path: <x@y.test>\r\n", b" folded\r\n", b"\tmore\r\n",
    b"return-path:<z@y.test>\r\n", b"X-Long: " + b"a" * 300 + b"\r\n"])


@settings(max_examples=200, deadline=None)
@given(st.lists(HEADER_LINES, max_size=12),
       st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"\r\n")),
       st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_dropping_return_path_does_not_depend_on_the_reads(
        headers: list[bytes], body: bytes, cuts: list[int]) -> None:
    message = b"".join(headers) + b"\r\n" + body
    expected, dropping = [], False
    for line in headers:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                expected.append(line)
            continue
        dropping = line.lower().startswith(b"return-path:")
        if not dropping:
            expected.append(line)
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(message[position:position + cut])
        position += cut
    pieces.append(message[position:])
    out = b"".join(without_return_path(iter([p for p in pieces if p])))
    assert out == b"".join(expected) + b"\r\n" + body


def test_delivered_to_is_lowercased_as_the_maildir_path(tmp_path: Path) -> None:
    envelope, message = setup(tmp_path)
    envelope.recipients[0].address = "Dave@example.test"
    deliver(envelope, message)
    [delivered] = files(tmp_path / "mail" / "user0")
    assert b"\nDelivered-To: dave@example.test\n" in delivered.read_bytes()
