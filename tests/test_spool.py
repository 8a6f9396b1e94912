"""The durable queue: commit, recovery after a crash, injected write failures, save/remove."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.python.failure import Failure

from core_fakes import FailingOS, open_fds, recipient, sync_run
from relaygw.envelope import Envelope, RecipientState
from relaygw.queuefile import FOOTER_SIZE, TRAILER_READ, is_queue_id, new_queue_id, trailer_footer
from relaygw.spool import BUFFER_LIMIT, Spool

MESSAGE = b"Received: from x\r\nSubject: hello\r\n\r\nbody line\r\n"


def make_spool(directory: Path, os_module: object = os, unnamed: bool | None = None) -> Spool:
    """A prepared spool; ``unnamed`` False forces the named temp file path (the
    fallback where the kernel or /proc gives no unnamed files)."""
    spool = Spool(directory, sync_run, os_module)
    spool.unnamed_files = unnamed
    spool.prepare()
    return spool


# Both ways of writing a new message: an unnamed file named at commit, and the
# fallback, a tmp-ID file linked to its name.
both_ways = pytest.mark.parametrize("unnamed", [True, False],
                                    ids=["unnamed file", "named temp file"])


def test_this_machine_gives_unnamed_files(tmp_path: Path) -> None:
    """The check finds O_TMPFILE and /proc here (Linux, ext4 or tmpfs), and leaves
    nothing behind; if it did not, the fast path would go untested."""
    spool = make_spool(tmp_path / "spool")
    assert spool.unnamed_files is True
    assert names(spool.directory) == []


def test_no_unnamed_files_without_o_tmpfile(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("relaygw.spool.O_TMPFILE", 0)
    spool = make_spool(tmp_path / "spool")
    assert spool.unnamed_files is False
    envelope, outcome = commit(spool)
    assert outcome is None
    assert spool.read_message(envelope.id) == MESSAGE


def test_no_unnamed_files_when_they_cannot_be_named(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No /proc (a chroot, a container without it): the link fails, the spool
    falls back to temp files and leaves no probe behind."""
    def no_proc(*args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError(errno.ENOENT, "no /proc")
    monkeypatch.setattr("relaygw.spool.os.link", no_proc)
    spool = make_spool(tmp_path / "spool")
    assert spool.unnamed_files is False
    assert names(spool.directory) == []


def result_of(d: Deferred[object]) -> object:
    outcome: list[object] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    return outcome[0]


def commit(spool: Spool, data: bytes = MESSAGE, **fields: object) -> tuple[Envelope, object]:
    incoming = spool.open_incoming()
    incoming.write(data)
    envelope = Envelope(id=incoming.id, sender="s@src.test",
                        recipients=[recipient("a@dst.test"), recipient("b@dst.test")],
                        received=1000.0, client_address="192.0.2.1", helo="client.test",
                        **fields)  # type: ignore[arg-type]
    return envelope, result_of(spool.commit(incoming, envelope))


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))



def test_queue_ids() -> None:
    ids = [new_queue_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(is_queue_id(i) for i in ids)
    assert not is_queue_id("../etc/passwd") and not is_queue_id("abc")


def test_commit_then_recover(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, outcome = commit(spool)
    assert outcome is None
    assert envelope.size == len(MESSAGE)
    assert names(spool.directory) == [f"{envelope.id}.q"]  # one file: one fsync
    assert spool.read_message(envelope.id) == MESSAGE
    raw = spool.message_path(envelope.id).read_bytes()
    assert raw.startswith(MESSAGE) and raw.endswith(trailer_footer(len(raw) - len(MESSAGE)
                                                                   - FOOTER_SIZE))

    recovered = list(make_spool(tmp_path / "spool").recover())
    assert recovered == [envelope]
    assert spool.load(envelope.id) == envelope


def test_commit_of_a_message_bigger_than_the_buffer(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    data = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    data *= (3 * BUFFER_LIMIT) // len(data) + 1
    incoming = spool.open_incoming()
    for start in range(0, len(data), 1000):
        incoming.write(data[start:start + 1000])
    envelope = Envelope(id=incoming.id, sender="", recipients=[recipient("a@b.test")],
                        received=0.0)
    assert result_of(spool.commit(incoming, envelope)) is None
    assert spool.read_message(envelope.id) == data
    assert envelope.size == len(data)


@both_ways
def test_permissions(tmp_path: Path, unnamed: bool) -> None:
    directory = tmp_path / "deep" / "spool"
    spool = make_spool(directory, unnamed=unnamed)
    envelope, _ = commit(spool)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert names(directory) == [f"{envelope.id}.q"]
    for name in names(directory):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    fds = open_fds(tmp_path)
    incoming = spool.open_incoming()
    incoming.write(b"x" * BUFFER_LIMIT)  # a big message reaches the disk while received
    assert incoming.fd is not None
    assert os.fstat(incoming.fd).st_size == BUFFER_LIMIT
    assert stat.S_IMODE(os.fstat(incoming.fd).st_mode) == 0o600
    assert incoming.named is not unnamed
    assert names(directory) == [f"{envelope.id}.q"] + (
        [] if unnamed else [incoming.temp_path.name])
    spool.discard(incoming)
    assert names(directory) == [f"{envelope.id}.q"]
    assert open_fds(tmp_path) == fds


def test_prepare_tightens_an_existing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    make_spool(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


@both_ways
@pytest.mark.parametrize("size", [7, BUFFER_LIMIT + 7], ids=["buffered", "on disk"])
def test_discard_leaves_nothing(tmp_path: Path, unnamed: bool, size: int) -> None:
    spool = make_spool(tmp_path / "spool", unnamed=unnamed)
    fds = open_fds(tmp_path)
    incoming = spool.open_incoming()
    incoming.write(b"x" * size)
    assert (incoming.fd is not None) is (size > BUFFER_LIMIT)
    spool.discard(incoming)
    spool.discard(incoming)  # twice is harmless
    assert names(spool.directory) == []
    assert open_fds(tmp_path) == fds


def count_commit_calls(tmp_path: Path, unnamed: bool) -> list[str]:
    fake = FailingOS()
    spool = make_spool(tmp_path / "dry-run", fake, unnamed=unnamed)
    incoming = spool.open_incoming()
    incoming.write(MESSAGE)
    fake.armed = True
    envelope = Envelope(id=incoming.id, sender="", recipients=[recipient("a@b.test")],
                        received=0.0)
    assert result_of(spool.commit(incoming, envelope)) is None
    return fake.calls


@both_ways
def test_commit_makes_every_step_durable(tmp_path: Path, unnamed: bool) -> None:
    calls = count_commit_calls(tmp_path, unnamed)
    # the queue file created (lazily, in the commit), message and envelope trailer
    # written and fsynced; named (a link of the unnamed file, or of the temp file,
    # which never replaces a name); the directory fsynced
    assert calls == ["open", "write", "fsync", "link", "fsync"]


@both_ways
def test_failure_at_every_step_of_commit_leaves_nothing(tmp_path: Path, unnamed: bool) -> None:
    steps = count_commit_calls(tmp_path, unnamed)
    for step in range(1, len(steps) + 1):
        directory = tmp_path / f"fail-at-{step}"
        fake = FailingOS(fail_at=step)
        spool = make_spool(directory, fake, unnamed=unnamed)
        fds = open_fds(tmp_path)
        incoming = spool.open_incoming()
        incoming.write(MESSAGE)
        envelope = Envelope(id=incoming.id, sender="s@src.test",
                            recipients=[recipient("a@b.test")], received=0.0)
        fake.armed = True
        outcome = result_of(spool.commit(incoming, envelope))
        fake.armed = False
        where = f"failing {steps[step - 1]} (call {step})"
        assert isinstance(outcome, Failure), where
        assert outcome.check(OSError), where
        assert outcome.value.errno == errno.ENOSPC, where
        assert names(directory) == [], where
        assert open_fds(tmp_path) == fds, f"file descriptor leaked when {where}"
        assert list(spool.recover()) == [], where
        spool.close()


@both_ways
def test_failure_while_receiving_is_reported_at_once(tmp_path: Path, unnamed: bool) -> None:
    fake = FailingOS(fail_at=1)
    spool = make_spool(tmp_path / "spool", fake, unnamed=unnamed)
    incoming = spool.open_incoming()
    fake.armed = True
    with pytest.raises(OSError) as caught:
        incoming.write(b"x" * BUFFER_LIMIT)
    assert caught.value.errno == errno.ENOSPC
    spool.discard(incoming)
    assert names(spool.directory) == []


def seed(directory: Path, name: str, data: bytes) -> None:
    (directory / name).write_bytes(data)


def test_recover_cleans_up_after_a_crash(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = make_spool(directory)
    good, _ = commit(spool)
    second, _ = commit(spool)
    half_removed, no_trailer, garbage, bad_version = (new_queue_id() for _ in range(4))
    seed(directory, f"tmp-{new_queue_id()}", b"half a message")
    seed(directory, f"tmp-{new_queue_id()}.env", b"{")
    seed(directory, f"{half_removed}.env", good.to_bytes())  # its queue file was unlinked
    seed(directory, f"{no_trailer}.q", MESSAGE)            # damaged: no envelope anywhere
    seed(directory, f"{garbage}.env", b"not json")
    seed(directory, f"{garbage}.q", MESSAGE)
    seed(directory, f"{bad_version}.q", MESSAGE + b'{"version": 99}'
         + trailer_footer(len(b'{"version": 99}')))

    recovered = list(make_spool(directory).recover())

    assert sorted(e.id for e in recovered) == sorted([good.id, second.id])
    assert names(directory) == sorted([f"{good.id}.q", f"{second.id}.q", "corrupt"])
    assert names(directory / "corrupt") == sorted([
        f"{no_trailer}.q", f"{garbage}.env", f"{garbage}.q", f"{bad_version}.q"])
    assert (directory / "corrupt" / f"{garbage}.env").read_bytes() == b"not json"
    assert stat.S_IMODE((directory / "corrupt").stat().st_mode) == 0o700
    # a second start-up finds the same, and nothing more to clean
    assert sorted(e.id for e in make_spool(directory).recover()) == sorted([good.id,
                                                                            second.id])


@pytest.mark.parametrize("footer", [
    b"", b"\nrelaygw-envelope 0000000099\n", b"\nrelaygw-envelope 00000000x9\n",
    b"\nrelaygw-envelope  000000009\n", b"\nsomething-else 0000000009\n"])
def test_a_damaged_trailer_is_quarantined_not_trusted(tmp_path: Path, footer: bytes) -> None:
    directory = tmp_path / "spool"
    spool = make_spool(directory)
    envelope, _ = commit(spool)
    raw = spool.message_path(envelope.id).read_bytes()
    spool.message_path(envelope.id).write_bytes(raw[:-FOOTER_SIZE] + footer)
    assert list(make_spool(directory).recover()) == []
    assert names(directory / "corrupt") == [f"{envelope.id}.q"]


def test_entries_of_the_two_file_layout_are_taken_over(tmp_path: Path) -> None:
    """Spools written before the trailer: ID.msg is the bare message, ID.env the
    envelope; an ID.msg alone was never committed (as that layout had it)."""
    directory = tmp_path / "spool"
    make_spool(directory)
    envelope = Envelope(id=new_queue_id(), sender="s@src.test",
                        recipients=[recipient("a@dst.test")], received=1.0,
                        size=len(MESSAGE))
    orphan = new_queue_id()
    seed(directory, f"{envelope.id}.msg", MESSAGE)
    seed(directory, f"{envelope.id}.env", envelope.to_bytes())
    seed(directory, f"{orphan}.msg", MESSAGE)
    spool = make_spool(directory)
    assert list(spool.recover()) == [envelope]
    assert names(directory) == [f"{envelope.id}.env", f"{envelope.id}.q"]  # renamed
    assert spool.read_message(envelope.id) == MESSAGE
    assert list(make_spool(directory).recover()) == [envelope]  # and again, as it is now


def test_an_older_relaygw_leaves_queue_files_alone(tmp_path: Path) -> None:
    """A downgrade: the two-file layout's recovery deleted every ID.msg without an
    ID.env; queue files are called ID.q so that it does not recognise them."""
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    assert names(spool.directory) == [f"{envelope.id}.q"]  # no ID.msg for it to delete
    spool.save(envelope)
    assert names(spool.directory) == [f"{envelope.id}.env", f"{envelope.id}.q"]


def test_an_io_error_while_loading_quarantines_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    entries = spool.scan()

    def no_descriptors(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("relaygw.spool.os.open", no_descriptors)
    with pytest.raises(OSError):
        spool.load_entries(entries)
    monkeypatch.undo()
    assert names(spool.directory) == [f"{envelope.id}.q"]  # not set aside in corrupt/
    assert spool.load_entries(entries) == [envelope]


@pytest.mark.parametrize("odd", [b"null", b"42", b'"text"', b"[]", b'{"version": 1}',
                                 b'{"version": 1, "recipients": 3}'])
def test_an_envelope_of_the_wrong_shape_is_quarantined(tmp_path: Path, odd: bytes) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    good, _ = commit(spool)
    seed(spool.directory, f"{envelope.id}.env", odd)
    assert spool.load_entries(spool.scan()) == [good]  # the rest of the batch still loads
    assert names(spool.directory / "corrupt") == [f"{envelope.id}.env", f"{envelope.id}.q"]


def test_an_envelope_longer_than_one_tail_read_loads(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    incoming = spool.open_incoming()
    incoming.write(MESSAGE)
    envelope = Envelope(id=incoming.id, sender="s@src.test", received=0.0,
                        recipients=[recipient(f"{'x' * 60}{i}@dst.test") for i in range(100)])
    assert result_of(spool.commit(incoming, envelope)) is None
    assert len(envelope.to_bytes()) > TRAILER_READ
    assert list(make_spool(spool.directory).recover()) == [envelope]
    assert spool.read_message(envelope.id) == MESSAGE


def test_message_file_stops_where_the_trailer_starts(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    with spool.open_message(envelope) as message:
        first = message.read(10)
        rest = message.read(10**6)
        assert message.read(10) == b"" and message.read() == b""
    assert first + rest == MESSAGE


def test_recover_of_an_empty_spool(tmp_path: Path) -> None:
    assert list(make_spool(tmp_path / "spool").recover()) == []


def test_save_rewrites_the_envelope_atomically(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    envelope.recipients[0].state = RecipientState.DELIVERED
    envelope.recipients[1].state = RecipientState.DEFERRED
    envelope.recipients[1].attempts = 1
    envelope.recipients[1].next_attempt = 2000.0
    envelope.recipients[1].last_error = "451 4.4.1 try later"
    assert result_of(spool.save(envelope)) is None
    assert spool.load(envelope.id) == envelope
    assert list(make_spool(spool.directory).recover()) == [envelope]  # the rewrite wins
    assert names(spool.directory) == [f"{envelope.id}.env", f"{envelope.id}.q"]
    assert stat.S_IMODE(spool.envelope_path(envelope.id).stat().st_mode) == 0o600


@pytest.mark.parametrize("step", range(1, 6))
def test_failed_save_keeps_the_previous_envelope(tmp_path: Path, step: int) -> None:
    fake = FailingOS(fail_at=step)
    spool = make_spool(tmp_path / "spool", fake)
    envelope, _ = commit(spool)
    before = spool.load(envelope.id).to_bytes()
    envelope.recipients[0].state = RecipientState.DELIVERED
    fake.armed = True
    outcome = result_of(spool.save(envelope))
    fake.armed = False
    assert isinstance(outcome, Failure) and outcome.value.errno == errno.ENOSPC
    if step <= 4:  # open, write, fsync, rename: the committed envelope stands
        assert spool.load(envelope.id).to_bytes() == before
        assert names(spool.directory) == [f"{envelope.id}.q"]
    else:  # the directory fsync: the rename happened, the new record stands
        assert spool.load(envelope.id).to_bytes() == envelope.to_bytes()
        assert names(spool.directory) == [f"{envelope.id}.env", f"{envelope.id}.q"]


def test_delivering_is_never_written(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    envelope.recipients[0].state = RecipientState.DELIVERING
    envelope.recipients[1].state = RecipientState.DELIVERING
    envelope.recipients[1].attempts = 2
    spool.save(envelope)
    states = [r.state for r in spool.load(envelope.id).recipients]
    assert states == [RecipientState.QUEUED, RecipientState.DEFERRED]


def test_remove(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope, _ = commit(spool)
    other, _ = commit(spool)
    spool.save(envelope)  # an entry with a rewritten envelope goes whole too
    assert result_of(spool.remove(envelope.id)) is None
    assert names(spool.directory) == [f"{other.id}.q"]
    assert result_of(spool.remove(envelope.id)) is None  # already gone: fine
    assert [e.id for e in spool.recover()] == [other.id]


class HeldRunner:
    """A disk-thread stand-in that runs jobs when the test says: removals asked for
    meanwhile must join the waiting batch."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def run_next(self) -> None:
        fn, args, d = self.jobs.pop(0)
        try:
            result = fn(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


def test_removals_asked_for_together_share_one_disk_job(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    entries = [commit(spool)[0] for _ in range(4)]
    runner = HeldRunner()
    spool.run_blocking = runner
    fired: list[str] = []
    for envelope in entries[:3]:
        spool.remove(envelope.id).addCallback(lambda _, i=envelope.id: fired.append(i))
    assert len(runner.jobs) == 1
    assert fired == []  # not before the files are gone
    assert len(names(spool.directory)) == 4
    runner.run_next()
    assert fired == [e.id for e in entries[:3]]
    assert names(spool.directory) == [f"{entries[3].id}.q"]
    assert runner.jobs == []


def test_a_removal_asked_for_after_the_batch_was_taken_gets_its_own(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    first, second = commit(spool)[0], commit(spool)[0]
    runner = HeldRunner()
    spool.run_blocking = runner
    fired: list[str] = []
    spool.remove(first.id).addCallback(lambda _: fired.append(first.id))
    fn, args, d = runner.jobs.pop(0)
    result = fn(*args)  # the thread has taken the batch...
    spool.remove(second.id).addCallback(lambda _: fired.append(second.id))
    assert runner.jobs == []  # ...and the new one waits for it to report
    d.callback(result)
    assert fired == [first.id]
    assert len(runner.jobs) == 1
    runner.run_next()
    assert fired == [first.id, second.id]
    assert names(spool.directory) == []


def test_a_refused_removal_job_fails_every_waiting_removal(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope = commit(spool)[0]
    refusal = RuntimeError("can't start new thread")
    spool.run_blocking = lambda fn, *args: fail(refusal)
    outcome = result_of(spool.remove(envelope.id))
    assert isinstance(outcome, Failure) and outcome.value is refusal
    assert names(spool.directory) == [f"{envelope.id}.q"]  # nothing removed, and said so
    spool.run_blocking = sync_run
    assert result_of(spool.remove(envelope.id)) is None  # the next one is tried afresh
    assert names(spool.directory) == []


@pytest.mark.parametrize("error", [ValueError("unexpected"),
                                   SystemExit("thread told to stop")],
                         ids=["an error", "a BaseException"])
def test_an_error_removing_one_entry_fails_only_its_removal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Every entry the disk thread has taken is answered: the one that failed
    with its own Failure, the others as done."""
    spool = make_spool(tmp_path / "spool")
    bad, good = commit(spool)[0], commit(spool)[0]
    runner = HeldRunner()
    spool.run_blocking = runner
    real_remove = spool._remove

    def remove(queue_id: str) -> None:
        if queue_id == bad.id:
            raise error
        real_remove(queue_id)
    monkeypatch.setattr(spool, "_remove", remove)
    outcomes = [spool.remove(bad.id), spool.remove(good.id)]
    runner.run_next()
    results = [result_of(d) for d in outcomes]
    assert isinstance(results[0], Failure) and results[0].value is error
    assert results[1] is None
    assert names(spool.directory) == [f"{bad.id}.q"]
    assert result_of(spool.removals_finished()) is None


def test_a_removal_asked_for_from_a_removals_callback_never_runs_a_second_job(
        tmp_path: Path) -> None:
    """The scheduler's operator lock runs the next delete from the callback of the
    last one: it must join the queue, not start a job beside the running one."""
    spool = make_spool(tmp_path / "spool")
    first, second = commit(spool)[0], commit(spool)[0]
    runner = HeldRunner()
    spool.run_blocking = runner
    lock = DeferredLock()
    outcomes = [lock.run(spool.remove, first.id), lock.run(spool.remove, second.id)]
    assert len(runner.jobs) == 1
    runner.run_next()
    assert len(runner.jobs) == 1  # the second delete's, after the first job reported
    runner.run_next()
    assert runner.jobs == []
    assert [result_of(d) for d in outcomes] == [None, None]
    assert names(spool.directory) == []
    assert result_of(spool.removals_finished()) is None


def test_removals_finished_waits_for_the_batch_in_flight(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    assert result_of(spool.removals_finished()) is None  # nothing under way
    envelope = commit(spool)[0]
    runner = HeldRunner()
    spool.run_blocking = runner
    spool.remove(envelope.id)
    finished = spool.removals_finished()
    assert not finished.called
    runner.run_next()
    assert result_of(finished) is None
    assert names(spool.directory) == []


def test_a_commit_never_replaces_an_entry_of_the_same_name(tmp_path: Path) -> None:
    """Ids are unique by construction; should one ever be taken, naming the new
    (unnamed) file fails, since linkat does not replace, and the entry already
    there stays whole."""
    spool = make_spool(tmp_path / "spool", unnamed=True)
    existing, _ = commit(spool, b"first\r\n")
    incoming = spool.open_incoming()
    incoming.id = existing.id
    incoming.write(b"second\r\n")
    envelope = Envelope(id=existing.id, sender="", recipients=[recipient("a@b.test")],
                        received=0.0)
    fds = open_fds(tmp_path)
    outcome = result_of(spool.commit(incoming, envelope))
    assert isinstance(outcome, Failure) and outcome.value.errno == errno.EEXIST
    assert spool.read_message(existing.id) == b"first\r\n"
    assert names(spool.directory) == [f"{existing.id}.q"]
    assert open_fds(tmp_path) == fds  # the unnamed file made by the commit, closed


def test_removals_finished_waits_for_a_removal_asked_for_by_a_failed_ones_errback(
        tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    first, second = commit(spool)[0], commit(spool)[0]
    runner = HeldRunner()
    spool.run_blocking = lambda fn, *args: fail(RuntimeError("no thread"))
    finished: list[Deferred[None]] = []

    def again(_: object) -> None:  # the caller tries the other entry, threads back
        spool.run_blocking = runner
        spool.remove(second.id)
        finished.append(spool.removals_finished())
    spool.remove(first.id).addErrback(again)
    [waiting] = finished
    assert not waiting.called  # the second removal is still to run
    runner.run_next()
    assert waiting.called
    assert names(spool.directory) == [f"{first.id}.q"]


def test_a_runner_that_raises_fails_the_removal_and_blocks_nothing(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    envelope = commit(spool)[0]

    def broken(fn: Any, *args: Any) -> Deferred[Any]:
        raise RuntimeError("can't start new thread")
    spool.run_blocking = broken
    outcome = result_of(spool.remove(envelope.id))
    assert isinstance(outcome, Failure) and outcome.check(RuntimeError)
    assert result_of(spool.removals_finished()) is None  # nothing left in flight
    spool.run_blocking = sync_run
    assert result_of(spool.remove(envelope.id)) is None
    assert names(spool.directory) == []


def test_envelope_round_trip_keeps_every_field() -> None:
    envelope = Envelope(id="0000000000001000ABC", sender="",
                        recipients=[recipient("a@b.test", action="local", maildir="/m/a",
                                              original="x@b.test", attempts=3,
                                              state=RecipientState.FAILED,
                                              last_error="550 5.1.1 no", remote="mx")],
                        received=12.5, size=99, client_address="::1", helo="h", held=True,
                        extra={"k": [1, 2]})
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope


class BlockingFsyncOS:
    """``os`` whose first fsync waits for a signal, to line up concurrent callers."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fsyncs = 0

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        if self.fsyncs == 1:
            self.entered.set()
            assert self.release.wait(10)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_concurrent_directory_syncs_share_one_fsync(tmp_path: Path) -> None:
    fake = BlockingFsyncOS()
    spool = make_spool(tmp_path / "spool", fake)
    first = threading.Thread(target=spool._fsync_directory)
    first.start()
    assert fake.entered.wait(10)
    waiting = [threading.Thread(target=spool._fsync_directory) for _ in range(3)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while spool._requested < 4 and time.monotonic() < deadline:
        time.sleep(0.001)  # threads counting themselves in; no reactor involved
    fake.release.set()
    for thread in [first, *waiting]:
        thread.join(10)
    # the first caller's sync could not cover the later three; one more covers all
    assert fake.fsyncs == 2
    spool._fsync_directory()
    assert fake.fsyncs == 3


@both_ways
def test_a_commit_never_replaces_a_queue_file_of_the_same_name(tmp_path: Path,
                                                             unnamed: bool) -> None:
    spool = make_spool(tmp_path / "spool", unnamed=unnamed)
    incoming = spool.open_incoming()
    incoming.write(MESSAGE)
    spool.message_path(incoming.id).write_bytes(b"already here")
    envelope = Envelope(id=incoming.id, sender="", recipients=[recipient("a@b.test")],
                        received=0.0)
    failure = result_of(spool.commit(incoming, envelope))
    assert isinstance(failure, Failure) and failure.value.errno == errno.EEXIST
    assert spool.message_path(incoming.id).read_bytes() == b"already here"
    assert sorted(p.name for p in spool.directory.iterdir()) == [f"{incoming.id}.q"]


def test_on_a_file_system_without_hard_links_the_fallback_renames(tmp_path: Path) -> None:
    class NoLinks:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def link(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

    spool = make_spool(tmp_path / "spool", NoLinks(), unnamed=False)
    incoming = spool.open_incoming()
    incoming.write(MESSAGE)
    envelope = Envelope(id=incoming.id, sender="", recipients=[recipient("a@b.test")],
                        received=0.0)
    assert result_of(spool.commit(incoming, envelope)) is None
    assert sorted(p.name for p in spool.directory.iterdir()) == [f"{incoming.id}.q"]
    assert spool.read_message(incoming.id) == MESSAGE
