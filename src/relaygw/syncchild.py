"""The journal's syncer: ``python -S -m relaygw.syncchild JOURNAL_DIRECTORY``.

Why a process: the daemon writes journal records itself (into the page cache:
microseconds) and has this child make them durable. A writer thread did the
same work, but every hand-off to and from it fought the reactor thread for
the GIL: 14 futex calls a relayed message, and the reactor thread stalled
while the writer ran Python. A child shares no GIL; the daemon pays one pipe
write and one pipe read a batch.

``fdatasync`` makes the file's data durable whichever descriptor wrote it
(it acts on the file, POSIX and Linux alike), so the child opens each
segment itself, by name, read-only.

The protocol is lines on stdin, one answer line each on stdout, in order:

- ``S NAME`` fdatasync segment NAME; ``SD NAME`` then fsync the directory too
  (the segment is new: its name must outlive a crash as well);
- ``U NAME`` unlink segment NAME (gone already is fine), then fsync the directory;
- the answer: ``K``, or ``E ERRNO`` when the call failed.

NAME is a segment's file name (``segment_name``), never a path. The child
ignores SIGINT, SIGTERM and SIGHUP, which a terminal or systemd sends to the
whole group: it lives exactly as long as its stdin, so the daemon's own
shutdown (or a kill -9 of it) ends it, never a signal meant for the daemon.
Only the standard library is imported: it starts in tens of milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import BinaryIO

SEGMENT_NAME_LENGTH = len("0000000000000001.log")


def serve(directory: str, requests: BinaryIO, answer_fd: int) -> None:
    """Answer every request line until end of input (then close what is open)."""
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    current: tuple[bytes, int] | None = None  # the segment open for syncing
    try:
        for line in requests:
            op, _, name = line.rstrip(b"\n").partition(b" ")
            if op not in (b"S", b"SD", b"U") or not _a_segment_name(name):
                raise SystemExit(f"syncchild: not a request: {line!r:.100}")
            try:
                if op == b"U":
                    if current is not None and current[0] == name:
                        os.close(current[1])
                        current = None
                    try:
                        os.unlink(name, dir_fd=directory_fd)
                    except FileNotFoundError:
                        pass
                    os.fsync(directory_fd)
                else:
                    if current is None or current[0] != name:
                        if current is not None:
                            os.close(current[1])
                            current = None
                        current = (name, os.open(name, os.O_RDONLY | os.O_CLOEXEC,
                                                 dir_fd=directory_fd))
                    os.fdatasync(current[1])
                    if op == b"SD":
                        os.fsync(directory_fd)
                answer = b"K\n"
            except OSError as e:
                answer = b"E %d\n" % (e.errno or 0)
            os.write(answer_fd, answer)
    finally:
        if current is not None:
            os.close(current[1])
        os.close(directory_fd)


def _a_segment_name(name: bytes) -> bool:
    stem = name[:-4]
    return (len(name) == SEGMENT_NAME_LENGTH and name.endswith(b".log")
            and all(c in b"0123456789ABCDEF" for c in stem))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m relaygw.syncchild JOURNAL_DIRECTORY\n")
        return 2
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    serve(argv[1], sys.stdin.buffer, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
