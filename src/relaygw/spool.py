"""The durable queue: one queue file per entry, plus a state file once it changes.

Layout of ``[queue] directory`` (mode 0700, files 0600)::

    ID.q          the queue file: the message as received (CRLF, not dot-stuffed,
                  Received: first), then the envelope as committed (JSON,
                  relaygw.envelope), then a fixed-size footer giving the JSON's
                  length; its presence makes the entry exist
    ID.env        the envelope as rewritten after a delivery attempt, a hold or
                  a release: when present it supersedes the committed one
    tmp-ID[.env]  being written; removed at start-up

Why the envelope rides in the message file: a commit then costs one file
fsync (and a directory fsync shared by concurrent commits) instead of two;
on ext4 a second new file per message halves what the disk commits per
second. The message is the first ``size`` bytes (the envelope's ``size``),
so ``tail -c 4096 ID.q`` shows the committed envelope.

The suffix is new with this layout: the two-file layout before it used
``ID.msg`` (the bare message) beside ``ID.env``. Such an entry is renamed to
``ID.q`` at start-up (its ``ID.env`` stays in force, so no trailer is
needed); and an older relaygw, run on a spool of this layout, does not
recognise ``ID.q`` files and so leaves them alone instead of deleting them.

Commit order: message and trailer written to an unnamed file (``O_TMPFILE``)
and fsynced, given its name ``ID.q`` (``linkat`` through ``/proc/self/fd``),
directory fsynced. Only then does the SMTP server answer 250. A crash at any
point leaves either a complete entry or nothing: the kernel frees an unnamed
file with its last descriptor, and ext4 one left by a power cut at mount.
Why: creating, renaming and removing a named temp file cost the kernel about
twice the CPU of an unnamed file given its name once (measured on ext4 with
ten committing threads: 0.6 against 1.2 ms of system time per message, 2,000
against 1,300 commits a second). Where the kernel, the file system or a
missing ``/proc`` gives no such file (checked once, by ``prepare``), the
message is written to ``tmp-ID``, linked to ``ID.q`` (a link never replaces
a name) and the temp name removed; ``recover`` removes a temp file a crash
left. Removal unlinks ``ID.q`` first, so a half-removed entry (an
``ID.env`` alone) is ignored and cleaned up.

The format of one queue file is ``relaygw.queuefile``'s; turning a journal
left by a crash or a stop into queue files, ``relaygw.journalconvert``'s.

All blocking work runs through ``run_blocking`` (a thread pool in
production, a direct call in unit tests); the OS calls go through an
injectable ``os`` stand-in so tests can make writes fail.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.envelope import Envelope
from relaygw.journal import (
    Journal,
    Location,
    Record,
    live_messages,
    write_done_segment,
)
from relaygw.journal import read_message as read_journaled
from relaygw.journalconvert import convert_journal
from relaygw.messagecache import MessageCache
from relaygw.queuefile import (
    MessageFile,
    RawRecord,
    new_queue_id,
    parse_envelope,
    parse_records,
    read_trailer,
    trailer_footer,
)

T = TypeVar("T")
BUFFER_LIMIT = 64 * 1024
RECOVERY_BATCH = 1000  # entries read per trip to the thread pool at start-up
# Errors reading an entry that are about that file, not the machine (EMFILE,
# EIO...): the entry is left where it is and logged, and the rest of the queue
# is read on; retrying would keep every later entry waiting behind it.
ENTRY_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP,
                          errno.ENAMETOOLONG, errno.ENOTDIR})
O_TMPFILE = getattr(os, "O_TMPFILE", 0)  # 0 where the platform has none
# What link(2) says on a file system that has no hard links.
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})
KEEP_SEGMENTS = 4      # journal segments in use before lingering messages move to files


class BlockingRunner(Protocol):
    def __call__(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


class MessageSource(Protocol):
    """Where deliverers read a queued message from: the spool (its memory, its
    journal, its queue files), or, in tests, the queue file they are given."""

    def has_message_without_file(self, queue_id: str) -> bool: ...

    def open_for_delivery(self, envelope: Envelope,
                          message_path: Path) -> MessageFile | io.BytesIO: ...


class QueueFiles:
    """A MessageSource that is the queue files alone."""

    def has_message_without_file(self, queue_id: str) -> bool:
        return False

    def open_for_delivery(self, envelope: Envelope,
                          message_path: Path) -> MessageFile | io.BytesIO:
        return MessageFile(message_path, envelope.size)


def _is_entry_name(stem: str) -> bool:
    """Letters, digits, '-' and '_' only: what relaygw's ids (and the ids of
    hand-made test entries) are made of."""
    return stem.isascii() and stem != "" and stem.replace("-", "").replace("_", "").isalnum()


class Incoming:
    """A message being received: bytes buffered, written in big blocks.

    The file is created only when the first block is written; a message
    smaller than one block is written whole by the commit, in the thread pool,
    so the reactor thread never waits on the spool directory's lock (which an
    fsync in a pool thread can hold). It is unnamed until the commit names it,
    unless the spool cannot make unnamed files (then it is ``temp_path``)."""

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool = spool
        self.id = queue_id
        self.fd: int | None = None
        self.named = False  # the file is temp_path, not an unnamed one
        self.whole: bytes | None = None  # the message, when it was never flushed early
        # Set by the SMTP server when the Received: line and the DATA are CRLF-only
        # with no line starting with a dot: cached, the message is relayed without
        # the dot-stuffing scan (messagecache.WireReady).
        self.wire_ready = False
        self.size = 0
        self._buffer = bytearray()
        self.closed = False

    @property
    def temp_path(self) -> Path:
        return self.spool.directory / f"tmp-{self.id}"

    def write(self, data: bytes) -> None:
        """Raises OSError (ENOSPC, EIO, ...) as soon as the OS reports it."""
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= BUFFER_LIMIT:
            self.flush()

    def seal(self, envelope_bytes: bytes) -> None:
        """Append the envelope trailer and write out everything buffered."""
        if self.fd is None:  # all of it is still in the buffer: keep it for the cache
            self.whole = bytes(self._buffer)
        self._buffer += envelope_bytes
        self._buffer += trailer_footer(len(envelope_bytes))
        self.flush()

    def flush(self) -> None:
        if self._buffer:
            if self.fd is None:
                self.fd, self.named = self.spool._create_for(self)
            self.spool._write_all(self.fd, self._buffer)
            del self._buffer[:]


class Spool:
    log = Logger()

    def __init__(self, directory: Path, run_blocking: BlockingRunner, os_module: Any = os,
                 journal: Journal | None = None) -> None:
        """``journal`` (writing to ``journal_directory``) takes small messages;
        without one, every message gets a queue file, and a journal found on
        disk is only read (``relaygwctl`` while relaygw is stopped)."""
        self.directory = Path(directory)
        self.journal = journal
        # Messages in the journal and in no queue file (yet), where their bytes are.
        self.journaled: dict[str, Location] = {}
        # Journaled messages being moved to queue files (by a save, or for
        # lingering), and what waits for each move to end (a save or removal).
        self._moving: dict[str, list[Callable[[], None]]] = {}
        if journal is not None:
            journal.on_segment_started = self._journal_grew
        self._journal_on_disk: dict[str, Record] | None = None  # read once, without a writer
        self._directory = str(self.directory)  # for the hot paths: no Path objects
        self.run_blocking = run_blocking
        self.os = os_module
        self._count_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._requested = 0
        self._synced = 0
        self._directory_fd: int | None = None
        self.cache = MessageCache()  # small messages just committed, for relaying
        self._removals: deque[tuple[str, Deferred[None]]] = deque()
        self._removing = False  # a removal batch is queued, running or being handed out
        self._settled_waiters: list[Deferred[None]] = []
        self._directory_fd_lock = threading.Lock()
        # Whether new messages are unnamed files (O_TMPFILE); None: not yet checked.
        self.unnamed_files: bool | None = None

    # --- start-up --------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0700) and remove what a crash left half-written."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._directory_descriptor()
        self._check_unnamed_files()
        self.convert_journal()
        if self.journal is not None:
            self.journal.open()
            self.journal.start()

    @property
    def journal_directory(self) -> Path:
        return self.directory / "journal"

    def stop(self) -> None:
        """Write the journal's last records and stop its writer (blocking, brief)."""
        if self.journal is not None:
            self.journal.stop()

    def convert_journal(self) -> int:
        """Give every message left in the journal its queue file and retire the
        segments (blocking; at start-up): ``relaygw.journalconvert``."""
        return convert_journal(self.directory, self._directory_descriptor,
                               self._fsync_directory, self._write_all)

    def _journal_left_on_disk(self) -> dict[str, Record]:
        """The journal's live messages as a spool without a writer sees them
        (``relaygwctl`` while relaygw is stopped): read once."""
        if self.journal is not None:
            return {}
        if self._journal_on_disk is None:
            try:
                self._journal_on_disk = live_messages(self.journal_directory)[0]
            except FileNotFoundError:
                self._journal_on_disk = {}
        return self._journal_on_disk

    def _check_unnamed_files(self) -> bool:
        """Whether this spool can write new messages as unnamed files and name
        them at commit (checked once, by making and removing one; after that,
        no lock on the per-message path)."""
        if self.unnamed_files is not None:
            return self.unnamed_files
        with self._count_lock:
            if self.unnamed_files is None:
                self.unnamed_files = self._try_unnamed_file()
            return self.unnamed_files

    def _try_unnamed_file(self) -> bool:
        if not O_TMPFILE:
            return False
        probe = f"tmp-probe-{new_queue_id()}"  # a crash leaves a temp file: recover removes it
        try:
            fd = os.open(self._directory, os.O_WRONLY | O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError:  # EOPNOTSUPP, EISDIR (a kernel without it), ...
            return False
        try:
            os.link(f"/proc/self/fd/{fd}", probe, dst_dir_fd=self._directory_descriptor())
        except OSError:  # no /proc, or a file system that refuses
            return False
        finally:
            os.close(fd)
        os.unlink(probe, dir_fd=self._directory_descriptor())
        return True

    def close(self) -> None:
        """Close the spool's directory descriptor (also done when the spool is
        garbage); for tests and tools that make many spools."""
        with self._directory_fd_lock:
            if self._directory_fd is not None:
                self._closer()
                self._directory_fd = None

    def _directory_descriptor(self) -> int:
        """The spool directory, open for the spool's life: names are given and the
        directory fsynced through it, without an open and close each time."""
        fd = self._directory_fd
        if fd is None:
            with self._directory_fd_lock:
                if self._directory_fd is None:
                    self._directory_fd = os.open(
                        self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    self._closer = weakref.finalize(self, os.close, self._directory_fd)
                fd = self._directory_fd
        return fd

    def recover(self) -> Iterator[Envelope]:
        """Yield every complete entry (``scan`` then ``load_entries``, all at once)."""
        entries = self.scan()
        for start in range(0, len(entries), RECOVERY_BATCH):
            yield from self.load_entries(entries[start:start + RECOVERY_BATCH])

    def scan(self) -> list[tuple[str, bool]]:
        """Clean up after a crash and list the entries: (queue id, has ID.env), oldest
        first. Temp files and lone ID.env files (a removal cut short) are removed;
        entries of the two-file layout are renamed to ID.q.

        Run before anything is received: a temp file then belongs to nobody."""
        names = set(os.listdir(self.directory))
        entries = []
        migrated = False
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if suffix in ("q", "msg", "env") and not _is_entry_name(stem):
                # Not written by relaygw (ids are [0-9A-F]): left alone, never read
                # as mail, and kept out of the start-up reader's line format.
                self.log.warn("spool: {name!r} is not a queue file name; left alone",
                              name=name)
                continue
            if name.startswith("tmp-"):
                self._unlink_quietly(self.directory / name)
            elif suffix == "env" and f"{stem}.q" not in names and f"{stem}.msg" not in names:
                self._unlink_quietly(self.directory / name)  # removal was under way
            elif suffix == "msg":  # the two-file layout
                if f"{stem}.env" not in names:
                    self._unlink_quietly(self.directory / name)  # never committed
                    continue
                os.replace(self.directory / name, self.message_path(stem))
                migrated = True
                entries.append((stem, True))
            elif suffix == "q":
                entries.append((stem, f"{stem}.env" in names))
        if migrated:
            self._fsync_directory()
        entries.sort()
        return entries

    def load_entries(self, entries: list[tuple[str, bool]]) -> list[Envelope]:
        """The envelopes of entries listed by ``scan`` (blocking)."""
        return self.read_entries(entries)[0]

    def read_entries(self, entries: list[tuple[str, bool]]
                     ) -> tuple[list[Envelope], list[tuple[str, str]]]:
        """The envelopes of entries listed by ``scan`` (blocking), and the entries
        set aside (and logged), as (queue id, problem).

        An entry whose envelope does not parse is set aside in ``corrupt/``,
        never deleted; the rest as ``read_raw_entries`` says."""
        records, unreadable = self.read_raw_entries(entries)
        for queue_id, problem in unreadable:
            self.log_unreadable(queue_id, problem)
        envelopes, damaged = parse_records(records)
        self.quarantine(damaged)
        return envelopes, damaged

    def read_raw_entries(self, entries: list[tuple[str, bool]]
                         ) -> tuple[list[RawRecord], list[tuple[str, str]]]:
        """The stored envelopes of entries listed by ``scan`` (blocking), unparsed:
        records ``(id, raw, None)``, or ``(id, None, problem)`` for a damaged
        trailer; and the entries that cannot be read for a reason of their own
        (``ENTRY_ERRORS``: permissions, a directory...) as (id, problem), to be
        logged and left in place. One gone meanwhile is skipped. Any other OSError
        (EMFILE, EIO...) says nothing about the entry: it is raised for the caller
        to try the batch again, and good mail is never set aside for it.

        Both start-up readers use it: the disk threads and the child process."""
        records: list[RawRecord] = []
        unreadable: list[tuple[str, str]] = []
        for queue_id, rewritten in entries:
            try:
                records.append((queue_id, self.read_raw_envelope(queue_id, rewritten), None))
            except FileNotFoundError:
                continue
            except ValueError as e:
                records.append((queue_id, None, str(e)))
            except OSError as e:
                if e.errno not in ENTRY_ERRORS:
                    raise
                unreadable.append((queue_id, e.strerror or str(e)))
        return records, unreadable

    def quarantine(self, entries: list[tuple[str, str]]) -> None:
        """Set entries aside in ``corrupt/`` (blocking), each logged as soon as it
        is moved: an I/O error on the next one cannot leave one moved unsaid."""
        for queue_id, problem in entries:
            self._quarantine(queue_id)
            self.log_quarantined(queue_id, problem)

    def _quarantine(self, queue_id: str) -> None:
        """Keep an unreadable entry for the operator instead of deleting mail."""
        corrupt = self.directory / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        for suffix in (".q", ".env"):  # the queue file first: what is left is no entry
            source = self.directory / f"{queue_id}{suffix}"
            if source.exists():
                os.replace(source, corrupt / source.name)

    def log_unreadable(self, queue_id: str, problem: str) -> None:
        self.log.error("spool: {id} cannot be read ({problem}); left in place, not queued"
                       " (fix it and restart)", id=queue_id, problem=problem)

    def log_quarantined(self, queue_id: str, problem: str) -> None:
        self.log.error("spool: {id} set aside in corrupt/: {problem}", id=queue_id,
                       problem=problem)

    # --- receiving -------------------------------------------------------------

    def open_incoming(self) -> Incoming:
        """A new message; its id is unique by construction (time, counter, random).
        Naming the file also checks it (a link fails on a name taken), except on
        a file system without hard links, where the fallback renames."""
        return Incoming(self, new_queue_id())

    def _create(self, path: Path) -> int:
        return self.os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def _create_for(self, incoming: Incoming) -> tuple[int, bool]:
        """A new file for ``incoming``: (descriptor, whether it is named temp_path)."""
        if self._check_unnamed_files():
            return self.os.open(self._directory, os.O_WRONLY | O_TMPFILE | os.O_CLOEXEC,
                                0o600), False
        return self._create(incoming.temp_path), True

    def discard(self, incoming: Incoming) -> None:
        """Forget a message that will not be queued (refused, or the client left)."""
        if incoming.closed:
            return
        incoming.closed = True
        if incoming.fd is not None:
            self._close_quietly(incoming.fd)
            if incoming.named:
                self._unlink_quietly(incoming.temp_path)

    def commit(self, incoming: Incoming, envelope: Envelope) -> Deferred[None]:
        """Make the message and its envelope durable; fires when 250 may be said.

        A message still whole in memory goes to the journal when there is one
        (one append, a share of one fdatasync); a bigger one, already partly
        written, to its queue file."""
        envelope.size = incoming.size
        if self.journal is not None and incoming.fd is None and not incoming.closed:
            message = bytes(incoming._buffer)
            del incoming._buffer[:]
            incoming.closed = True
            d = self.journal.append_message(incoming.id, envelope.to_bytes(), message)
            return d.addCallback(self._journal_committed, incoming.id, message,
                                 incoming.wire_ready)
        d = self.run_blocking(self._commit, incoming, envelope.to_bytes())
        return d.addCallback(self._cache_committed, incoming)

    def _journal_committed(self, location: Location, queue_id: str, message: bytes,
                           wire_ready: bool) -> None:
        self.journaled[queue_id] = location
        self.cache.put(queue_id, message, wire_ready)

    def _cache_committed(self, result: None, incoming: Incoming) -> None:
        if incoming.whole is not None:
            self.cache.put(incoming.id, incoming.whole, incoming.wire_ready)
            incoming.whole = None
        return result

    def _commit(self, incoming: Incoming, envelope_bytes: bytes) -> None:
        final = self.message_path(incoming.id)
        named = False  # ID.q is this commit's: only then may a failure remove it
        try:
            incoming.seal(envelope_bytes)
            self.os.fsync(incoming.fd)
            if incoming.named:
                incoming.closed = True
                self.os.close(incoming.fd)
                # a link, not a rename: it never replaces a name (EEXIST if taken)
                try:
                    self.os.link(incoming.temp_path, final)
                except OSError as e:
                    if e.errno not in NO_HARD_LINKS:
                        raise
                    self.os.rename(incoming.temp_path, final)  # vfat, some FUSE mounts
                    named = True
                else:
                    named = True
                    self._unlink_quietly(incoming.temp_path)
            else:
                # linkat never replaces a name: EEXIST if the id were taken
                self.os.link(f"/proc/self/fd/{incoming.fd}", f"{incoming.id}.q",
                             dst_dir_fd=self._directory_descriptor())
                named = True
                incoming.closed = True
                self.os.close(incoming.fd)
            self._fsync_directory()
        except BaseException:
            if not incoming.closed:
                incoming.closed = True
                if incoming.fd is not None:
                    self._close_quietly(incoming.fd)
            if named:
                self._unlink_quietly(final)
            if incoming.named:
                self._unlink_quietly(incoming.temp_path)
            raise

    # --- the queue's life ------------------------------------------------------

    def message_path(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}.q"

    def envelope_path(self, queue_id: str) -> Path:
        return self.directory / f"{queue_id}.env"

    def save(self, envelope: Envelope) -> Deferred[None]:
        """Atomically rewrite an envelope after a delivery attempt.

        A journaled message first gets its queue file (message and this envelope,
        as a commit writes them), then its done record: a message that stays
        queued is a file that ``ls`` and ``tail -c`` show, and the journal only
        holds messages in their first attempt. (The scheduler never has two
        spool operations on one message in flight.)"""
        if envelope.id in self._moving:
            return self._after_move(envelope.id, lambda: self.save(envelope))
        location = self.journaled.get(envelope.id)
        if location is not None:
            envelope_bytes = envelope.to_bytes()
            message = self.cache.get(envelope.id)
            # Registered as a move while it runs: a move of the same message (the
            # journal growing) must not start beside it, and anything else waits.
            # The caller gets a Deferred of its own: cancelling it (shutdown cuts
            # attempts) must not end the registration while the write goes on.
            self._moving[envelope.id] = []
            job = maybeDeferred(self.run_blocking, self._materialize, envelope.id,
                                envelope_bytes, message, location)
            job.addCallback(self._materialized, envelope.id, location)
            job.addBoth(self._move_ended, envelope.id)
            answer: Deferred[None] = Deferred()
            job.chainDeferred(answer)
            return answer
        if self.journal is None and envelope.id in self._journal_left_on_disk() \
                and not self.message_path(envelope.id).exists():
            record = self._journal_left_on_disk()[envelope.id]
            assert record.location is not None
            return self.run_blocking(self._materialize, envelope.id, envelope.to_bytes(),
                                     None, record.location)
        return self.run_blocking(self._save, envelope.id, envelope.to_bytes())

    def _materialize(self, queue_id: str, envelope_bytes: bytes, message: bytes | None,
                     location: Location) -> None:
        """Write a journaled message's queue file (blocking): the done record may
        follow only once this returns."""
        if message is None:
            message = read_journaled(self.journal_directory, location)
        incoming = Incoming(self, queue_id)
        incoming.write(message)
        self._commit(incoming, envelope_bytes)

    def _journal_grew(self, number: int) -> None:
        """A new segment: if more than KEEP_SEGMENTS are in use, move the messages
        still live in the oldest to queue files (with the envelope they were
        committed with, the latest durable one). Mail parked behind a dead
        next hop, or waiting long for its turn, would otherwise keep that
        segment and every later one on disk, and make the start-up conversion
        long. Failed moves are tried again at the next segment."""
        assert self.journal is not None
        in_use = self.journal.segments_in_use()
        if len(in_use) <= KEEP_SEGMENTS:
            return
        oldest = in_use[0]
        for queue_id, location in list(self.journaled.items()):
            if location.segment == oldest and queue_id not in self._moving:
                self._moving[queue_id] = []
                d = self.run_blocking(self._move_to_file, queue_id,
                                      self.cache.get(queue_id), location)
                d.addBoth(self._moved, queue_id, location)
                d.addErrback(lambda f, queue_id=queue_id: self.log.failure(
                    "spool: moving {id} from the journal", f, id=queue_id))

    def _move_to_file(self, queue_id: str, message: bytes | None, location: Location) -> None:
        self._materialize(queue_id, self._committed_envelope(location), message, location)

    def _committed_envelope(self, location: Location) -> bytes:
        """The envelope a journaled message was committed with (blocking)."""
        return read_journaled(self.journal_directory, Location(
            location.segment, location.offset - location.envelope_length,
            location.envelope_length))

    def _moved(self, result: object, queue_id: str, location: Location) -> None:
        try:
            if isinstance(result, Failure):
                self.log.error("spool: cannot move {id} from the journal to a queue file:"
                               " {error}; it stays in the journal", id=queue_id,
                               error=result.getErrorMessage())
            else:
                self._materialized(None, queue_id, location)
        finally:
            self._move_ended(None, queue_id)

    def _move_ended(self, result: T, queue_id: str) -> T:
        """A move (or a save moving the message) is over: what waited runs now."""
        for resume in self._moving.pop(queue_id, []):
            resume()
        return result

    def _after_move(self, queue_id: str, operation: Callable[[], Deferred[None]]
                    ) -> Deferred[None]:
        """``operation`` once the move of ``queue_id`` has ended, either way."""
        d: Deferred[None] = Deferred()
        self._moving[queue_id].append(lambda: maybeDeferred(operation).chainDeferred(d))
        return d

    def _materialized(self, result: None, queue_id: str, location: Location) -> None:
        if self.journaled.get(queue_id) == location:
            del self.journaled[queue_id]
            assert self.journal is not None
            self.journal.append_done(queue_id, location)

    def _save(self, queue_id: str, envelope_bytes: bytes) -> None:
        temp = self.directory / f"tmp-{queue_id}.env"
        try:
            self._write_file(temp, envelope_bytes)
            self.os.rename(temp, self.envelope_path(queue_id))
            self._fsync_directory()
        except BaseException:
            self._unlink_quietly(temp)
            raise

    def remove(self, queue_id: str) -> Deferred[None]:
        """Remove an entry; fires once it is gone from the directory.

        Removals asked for while one batch waits for or runs in a disk thread
        join it: a busy relay removes a message per delivery, and one job per
        batch spares the reactor a hand-off per message. No fsync: an entry a
        crash brings back is delivered again (at least once, never lost).

        A journaled message only needs its done record, which is not waited for."""
        if queue_id in self._moving:
            return self._after_move(queue_id, lambda: self.remove(queue_id))
        self.cache.discard(queue_id)
        location = self.journaled.pop(queue_id, None)
        if location is not None and self.journal is not None:
            self.journal.append_done(queue_id, location)
            return succeed(None)
        if self.journal is None and queue_id in self._journal_left_on_disk():
            return self.run_blocking(self._remove_offline, queue_id)
        d: Deferred[None] = Deferred()
        self._removals.append((queue_id, d))
        if not self._removing:
            self._removing = True
            maybeDeferred(self.run_blocking, self._remove_waiting).addBoth(self._removed)
        return d

    def _remove_waiting(self) -> list[tuple[Deferred[None], Failure | None]]:
        """Unlink every entry waiting for removal (in a disk thread; one such job
        at a time, for ``_removing`` stays set until its results are handed out)."""
        done: list[tuple[Deferred[None], Failure | None]] = []
        while True:
            try:
                queue_id, d = self._removals.popleft()
            except IndexError:
                return done
            try:
                self._remove(queue_id)
            except BaseException:  # the popped ones must still be answered
                done.append((d, Failure()))
            else:
                done.append((d, None))

    def _removed(self, result: list[tuple[Deferred[None], Failure | None]] | Failure) -> None:
        """Hand out a batch's results (reactor thread). ``_removing`` stays set while
        they are: a callback that removes again (the scheduler's operator lock
        runs the next delete from the last one's callback) only joins the queue,
        and no second job ever drains it alongside this one."""
        if isinstance(result, Failure):  # the job was refused (no thread): fail them all
            waiting = [d for _, d in self._removals]
            self._removals.clear()
            self._removing = False  # an errback that removes again starts afresh
            for d in waiting:
                d.errback(result)
        else:
            for d, failure in result:
                if failure is None:
                    d.callback(None)
                else:
                    d.errback(failure)
            if self._removals:  # asked for after the batch was taken, or by a callback
                maybeDeferred(self.run_blocking, self._remove_waiting).addBoth(self._removed)
            else:
                self._removing = False
        if not self._removing:
            self._removals_settled()

    def removals_finished(self) -> Deferred[None]:
        """Fires once no removal is waiting or running: shutdown waits for it
        before stopping the disk threads, so a removal asked for at the last
        moment is not left queued for threads that have gone."""
        if not self._removing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled_waiters.append(d)
        return d

    def _removals_settled(self) -> None:
        waiters, self._settled_waiters = self._settled_waiters, []
        for d in waiters:
            d.callback(None)

    def _remove_offline(self, queue_id: str) -> None:
        """Remove an entry the journal holds, relaygw stopped: its files if any,
        and a done record the next start-up reads before converting."""
        self._remove(queue_id)
        write_done_segment(self.journal_directory, queue_id)
        self._journal_left_on_disk().pop(queue_id, None)

    def _remove(self, queue_id: str) -> None:
        # The queue file first: an ID.env left alone by a crash is no entry.
        self._unlink_quietly(self.message_path(queue_id))
        self._unlink_quietly(self.envelope_path(queue_id))

    def queue_ids(self) -> list[str]:
        """The ids of the entries on disk now, oldest first (blocking): queue
        files, and messages in the journal."""
        files = {name[:-2] for name in os.listdir(self.directory)
                 if name.endswith(".q") and not name.startswith("tmp-")}
        return sorted(files | set(self._journal_left_on_disk()) | set(self.journaled))

    def load(self, queue_id: str) -> Envelope:
        """The entry's current envelope as stored (blocking; for ``relaygwctl``);
        FileNotFoundError if there is none. A message this spool journaled is
        read from its record; otherwise a queue file has the last word over a
        record of the same message found in the journal on disk."""
        location = self.journaled.get(queue_id)
        if location is not None:
            return parse_envelope(self._committed_envelope(location))
        try:
            return self._read_envelope(queue_id, self.envelope_path(queue_id).exists())
        except FileNotFoundError:
            record = self._journal_left_on_disk().get(queue_id)
            if record is None:
                raise
            return parse_envelope(record.envelope)

    def _read_envelope(self, queue_id: str, rewritten: bool) -> Envelope:
        """ValueError when the envelope does not parse; OSError when it cannot be read."""
        return parse_envelope(self.read_raw_envelope(queue_id, rewritten))

    def read_raw_envelope(self, queue_id: str, rewritten: bool) -> bytes:
        """The entry's current envelope as stored (blocking): ``ID.env`` when
        ``rewritten`` and still there, else the queue file's trailer. ValueError
        for a damaged trailer; OSError (FileNotFoundError: the entry is gone)
        when it cannot be read."""
        if rewritten:
            try:
                with open(f"{self._directory}/{queue_id}.env", "rb") as env:
                    raw = env.read()
            except FileNotFoundError:
                pass  # removed or superseded between the listing and now
            else:
                if not self.message_path(queue_id).exists():
                    raise FileNotFoundError(errno.ENOENT, "no such entry", queue_id)
                return raw
        fd = os.open(f"{self._directory}/{queue_id}.q", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return read_trailer(fd)
        finally:
            os.close(fd)

    def open_message(self, envelope: Envelope) -> MessageFile | io.BytesIO:
        """The message of ``envelope``'s entry, for reading (blocking unless
        cached): from memory, the journal, or its queue file."""
        return self.open_for_delivery(envelope, self.message_path(envelope.id))

    def has_message_without_file(self, queue_id: str) -> bool:
        """Whether the message is in memory or the journal (no queue file to check)."""
        return queue_id in self.journaled or self.cache.get(queue_id) is not None

    def open_for_delivery(self, envelope: Envelope,
                          message_path: Path) -> MessageFile | io.BytesIO:
        cached = self.cache.open(envelope.id)
        if cached is not None:
            return cached
        location = self.journaled.get(envelope.id)
        if location is not None:
            return io.BytesIO(read_journaled(self.journal_directory, location))
        try:
            return MessageFile(message_path, envelope.size)
        except FileNotFoundError:
            record = self._journal_left_on_disk().get(envelope.id)
            if record is None or record.location is None:
                raise
            return io.BytesIO(read_journaled(self.journal_directory, record.location))

    def read_message(self, queue_id: str) -> bytes:
        """The whole message of an entry (blocking; for small reads and tests)."""
        cached = self.cache.get(queue_id)
        if cached is not None:
            return cached
        location = self.journaled.get(queue_id)
        if location is not None:
            return read_journaled(self.journal_directory, location)
        envelope = self.load(queue_id)
        with self.open_message(envelope) as message:
            return message.read()

    # --- helpers ---------------------------------------------------------------

    def _write_all(self, fd: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            written = self.os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = self.os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._write_all(fd, data)
            self.os.fsync(fd)
        finally:
            self.os.close(fd)

    def _fsync_directory(self) -> None:
        """Make every rename done so far durable, sharing one fsync among the
        threads that ask at the same time (group commit for the directory).

        A caller counts itself in after its renames; whoever then holds the
        sync lock fsyncs for everyone counted so far. A caller whose number was
        covered by a sync that started after it counted itself in is done."""
        with self._count_lock:
            self._requested += 1
            mine = self._requested
        with self._sync_lock:
            if self._synced >= mine:
                return
            with self._count_lock:
                covered = self._requested
            self.os.fsync(self._directory_descriptor())
            self._synced = covered

    def _close_quietly(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def _unlink_quietly(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warn("spool: cannot remove {path}: {error}", path=str(path), error=e)
