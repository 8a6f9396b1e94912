"""The control channel: AMP over a UNIX socket in the spool directory (mode 0600).

``relaygwctl queue flush|hold|release|delete`` act on the running daemon through
it, so the scheduler (the one owner of the queue while the daemon runs) does the
work; ``queue list`` and ``queue show`` read the scheduler's envelopes in memory
through it (so a recipient in flight shows as ``delivering``). Only the spool
directory's owner can connect: the directory is 0700 and the socket 0600. Errors
travel as AMP errors whose description is the one-line message relaygwctl prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from relaygw.queuefile import is_queue_id
from relaygw.queueview import queue_listing, show_entry
from relaygw.scheduler import MessageHeld, Scheduler, UnknownMessage

SOCKET_NAME = "control.sock"
TIMEOUT = 10.0


class BadQueueId(Exception):
    """The argument is the whole one-line message, as for the scheduler's errors."""


_ERRORS: dict[type[Exception], bytes] = {
    UnknownMessage: b"UNKNOWN_MESSAGE",
    MessageHeld: b"MESSAGE_HELD",
    BadQueueId: b"BAD_QUEUE_ID",
}


class Flush(amp.Command):
    """Make deferred recipients due now: every message, or one. -> how many."""

    arguments = [(b"queue_id", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class Hold(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = _ERRORS


class Release(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = _ERRORS


class Delete(amp.Command):
    """-> ``in_flight``: the files go when the delivery attempt in flight ends."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"in_flight", amp.Boolean())]
    errors = _ERRORS


class BigUnicode(amp.Argument):
    """Text of any length: AMP caps one value at 65535 bytes, so this one spreads over
    the keys ``NAME`` (the number of parts) and ``NAME.0``, ``NAME.1``, ..."""

    CHUNK = 60000

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        data = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        raw = data.encode("utf-8")
        parts = [raw[i:i + self.CHUNK] for i in range(0, len(raw), self.CHUNK)] or [b""]
        strings[name] = str(len(parts)).encode("ascii")
        for index, part in enumerate(parts):
            strings[name + b"." + str(index).encode("ascii")] = part

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        count = int(self.retrieve(strings, name, proto))
        raw = b"".join(self.retrieve(strings, name + b"." + str(i).encode("ascii"), proto)
                       for i in range(count))
        objects[amp._wireNameToPythonIdentifier(name)] = raw.decode("utf-8")


class ListQueue(amp.Command):
    """-> ``json``: ``queue list --json``'s array (CONTRACT.md section 6), from memory."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"json", BigUnicode())]
    errors = _ERRORS


class ShowMessage(amp.Command):
    """-> ``json``: ``queue show``'s envelope object (relaygw.queueview.show_entry)."""

    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"json", BigUnicode())]
    errors = _ERRORS


def _checked(queue_id: str) -> str:
    if not is_queue_id(queue_id):
        raise BadQueueId(f"not a queue id: {queue_id}")
    return queue_id


class ControlProtocol(amp.AMP):
    """The daemon's side: each command is one Scheduler method."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    @Flush.responder
    def flush(self, queue_id: str | None = None) -> dict[str, Any]:
        if queue_id is not None:
            envelope = self.scheduler.envelope_of(_checked(queue_id))
            if envelope.held:
                raise MessageHeld.about(queue_id)
        return {"count": self.scheduler.flush(queue_id=queue_id)}

    @Hold.responder
    def hold(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self.scheduler.hold(_checked(queue_id)).addCallback(lambda _: {})

    @Release.responder
    def release(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self.scheduler.release(_checked(queue_id)).addCallback(lambda _: {})

    @Delete.responder
    def delete(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self.scheduler.delete(_checked(queue_id)).addCallback(
            lambda in_flight: {"in_flight": in_flight})


    @ListQueue.responder
    def list_queue(self) -> dict[str, Any]:
        return {"json": json.dumps(queue_listing(self.scheduler.messages.values()))}

    @ShowMessage.responder
    def show_message(self, queue_id: str) -> dict[str, Any]:
        envelope = self.scheduler.envelope_of(_checked(queue_id))
        return {"json": json.dumps(show_entry(envelope))}


class ControlFactory(Factory):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.scheduler)
        protocol.factory = self
        return protocol


def socket_path(spool_directory: Path) -> Path:
    return Path(spool_directory) / SOCKET_NAME


class ControlService(StreamServerEndpointService):
    """Listens in startService, not privilegedStartService (which twistd runs for
    every service before any startService): the socket's directory, the spool, is
    created by the gateway's startService."""

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        StreamServerEndpointService.privilegedStartService(self)


def control_service(scheduler: Scheduler, spool_directory: Path,
                    reactor: Any) -> ControlService:
    """The listener (``unix:PATH:mode=600:lockfile=1``); start it after the gateway,
    which creates the spool directory. A relative spool directory is resolved at
    start, inside twistd's run directory. The lock file lets a restart after a
    crash replace the stale socket."""
    endpoint = UNIXServerEndpoint(reactor, str(socket_path(spool_directory)), mode=0o600,
                                  wantPID=True)
    service = ControlService(endpoint, ControlFactory(scheduler))
    service._raiseSynchronously = True  # a socket we cannot bind stops start-up
    service.setName("control")
    return service


# --- relaygwctl's side -----------------------------------------------------------------


async def call(reactor: Any, path: Path, command: type[amp.Command], timeout: float = TIMEOUT,
               **arguments: Any) -> dict[str, Any]:
    """Connect to the daemon at ``path``, run one command, disconnect.

    Raises twisted.internet.error.ConnectError when nothing listens there (the
    daemon is not running), the command's errors as their exception classes,
    and CancelledError after ``timeout`` seconds.
    """
    endpoint = UNIXClientEndpoint(reactor, str(path), timeout=int(timeout))
    protocol = await endpoint.connect(Factory.forProtocol(amp.AMP)).addTimeout(timeout,
                                                                              reactor)
    try:
        d = protocol.callRemote(command, **arguments).addTimeout(timeout, reactor)
        return await d  # type: ignore[no-any-return]
    finally:
        protocol.transport.loseConnection()
