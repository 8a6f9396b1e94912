"""Start-up: every message left in the journal gets its queue file, then every
segment is retired, so the queue is files alone again before it is read back.

Why at start-up and all at once: the scheduler, ``relaygwctl`` and an
operator's ``ls`` know queue files; the journal is only the fast path of a
running relaygw (relaygw.journal). After a crash or a stop, its live
messages become ``ID.q`` files exactly as a save would have made them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from relaygw.journal import (
    fsync_directory,
    live_messages,
    segment_name,
    segment_numbers,
)
from relaygw.journal import read_message as read_journaled
from relaygw.queuefile import is_queue_id, new_queue_id, trailer_footer

# The spool's own log namespace: these lines read as they did when this was a
# Spool method, and an operator's filters on them keep working.
log = Logger(namespace="relaygw.spool.Spool")


def convert_journal(spool_directory: Path, directory_descriptor: Callable[[], int],
                    fsync_spool_directory: Callable[[], None],
                    write_all: Callable[[int, bytes], None]) -> int:
    """Give every message left in ``spool_directory``'s journal a queue file, then
    retire every segment (blocking; at start-up, before ``scan``): after a crash
    or a stop, the queue is files alone again. Returns how many it converted.
    ``directory_descriptor``, ``fsync_spool_directory`` and ``write_all`` are
    the spool's own (its directory kept open, asked for only when needed; a
    shared directory fsync; a write through its injectable ``os``).

    The files are written as ``tmp-ID``, made durable together (one
    ``syncfs`` where it reports write-back errors; else an fsync each), and
    only then renamed
    to ``ID.q``: a crash in between leaves temp files that ``scan`` removes
    and a journal that is converted again. A message that has a queue file
    already was moved out of the journal before its done record was
    written, and the file is complete (named only once durable): it is
    kept. A damaged segment goes to ``corrupt/`` (never overwritten) once
    what it held before the damage is queued; a torn tail of the newest
    segment held only appends never acknowledged."""
    directory = spool_directory / "journal"
    spool = str(spool_directory)
    if not directory.is_dir():
        return 0
    numbers = segment_numbers(directory)
    if not numbers:
        return 0
    live, problems = live_messages(directory)
    damaged = dict(problems)
    written: list[str] = []
    for queue_id, record in live.items():
        assert record.location is not None
        if not is_queue_id(queue_id):
            damaged.setdefault(record.location.segment, f"a record for {queue_id!r}")
            continue
        if os.path.exists(f"{spool}/{queue_id}.q"):
            continue
        message = read_journaled(directory, record.location)
        fd = os.open(f"{spool}/tmp-{queue_id}",
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, message + record.envelope + trailer_footer(len(record.envelope)))
        finally:
            os.close(fd)
        written.append(queue_id)
    if written:
        if not sync_file_system(directory_descriptor()):
            for queue_id in written:
                fd = os.open(f"{spool}/tmp-{queue_id}", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for queue_id in written:
            os.rename(f"{spool}/tmp-{queue_id}", f"{spool}/{queue_id}.q")
    # Queue files named before a crash may not have had their directory
    # fsync yet (and those written here must be named for good): before any
    # segment goes, the spool directory is made durable.
    fsync_spool_directory()
    for number in numbers:
        path = directory / segment_name(number)
        if number in damaged:
            log.error("spool: journal segment {name} is damaged ({problem}); what"
                      " came before the damage was queued, the segment is kept in"
                      " corrupt/", name=path.name, problem=damaged[number])
            corrupt = spool_directory / "corrupt"
            corrupt.mkdir(mode=0o700, exist_ok=True)
            os.replace(path, corrupt / f"journal-{new_queue_id()}-{path.name}")
            fsync_directory(corrupt)
            fsync_spool_directory()
        else:
            os.unlink(path)
        fsync_directory(directory)  # oldest first, each for good: no subset comes back
    if written:
        log.info("spool: {count} messages moved from the journal to queue files",
                 count=len(written))
    return len(written)


_libc: Any = None


def sync_file_system(fd: int) -> bool:
    """``syncfs(2)`` on the file system holding ``fd``: every write so far made
    durable at once. False where it cannot be trusted to say so (then fsync
    each): before Linux 5.8 it reported no write-back error (EIO, ENOSPC),
    and where the C library has none."""
    global _libc
    if not _reports_writeback_errors(os.uname().sysname, os.uname().release):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        syncfs = _libc.syncfs
    except (OSError, AttributeError):
        return False
    if syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return True


def _reports_writeback_errors(system: str, release: str) -> bool:
    """Whether this kernel's syncfs reports write-back errors (Linux 5.8+)."""
    if system != "Linux":
        return False
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)
