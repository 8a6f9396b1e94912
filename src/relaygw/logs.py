"""The mail log: one structured twisted.logger event per mail event.

Each event carries its fields (``queue_id``, ``sender``, ``recipient``,
``relay``, ``delay``, ``reply``, ``event``) as keys, so twistd's ``--logger``
choice can print them as text (the readable form below, close to Postfix's
maillog) or as JSON (``relaygw.logs.jsonLogger``).
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, ILogObserver, Logger, eventAsJSON

from relaygw.envelope import Envelope
from relaygw.scheduler import Event


class MailLog:
    log = Logger(namespace="relaygw.mail")

    def connect(self, client: str, listener: str) -> None:
        self.log.info("connect from {client} on {listener}", event="connect",
                      client=client, listener=listener)

    def disconnect(self, client: str) -> None:
        self.log.info("disconnect from {client}", event="disconnect", client=client)

    def reject(self, client: str, command: str, reply: str, reason: str,
               sender: str | None = None, recipient: str | None = None,
               queue_id: str | None = None) -> None:
        self.log.info("{prefix}reject: {command} from {client}: {reply}; from=<{sender}>"
                      " to=<{recipient}>", prefix=f"{queue_id}: " if queue_id else "",
                      event="reject", client=client, command=command, reply=reply,
                      reason=reason, sender=sender or "", recipient=recipient or "",
                      queue_id=queue_id)

    def received(self, envelope: Envelope, client: str) -> None:
        self.log.info("{queue_id}: received from=<{sender}>, size={size}, nrcpt={nrcpt},"
                      " client={client}", event="received", queue_id=envelope.id,
                      sender=envelope.sender, size=envelope.size,
                      nrcpt=len(envelope.recipients), client=client,
                      recipients=[r.address for r in envelope.recipients])

    def outcome(self, event: Event) -> None:
        self.log.info("{queue_id}: to=<{recipient}>{orig}, relay={relay}, delay={delay:.2f},"
                      " status={event} ({reply})", event=event.kind,
                      queue_id=event.envelope.id, sender=event.envelope.sender,
                      recipient=event.recipient.address,
                      orig=(f", orig_to=<{event.recipient.original}>"
                            if event.recipient.original != event.recipient.address else ""),
                      relay=event.recipient.remote or event.recipient.action,
                      delay=event.delay, reply=event.reply,
                      attempts=event.recipient.attempts)

    def bounce_queued(self, envelope: Envelope, bounce_id: str) -> None:
        self.log.info("{queue_id}: sender non-delivery notification: {bounce_id}",
                      event="bounce", queue_id=envelope.id, bounce_id=bounce_id)


def jsonLogger() -> ILogObserver:
    """``twistd --logger relaygw.logs.jsonLogger``: one JSON object per line on stdout."""
    return FileLogObserver(sys.stdout, lambda event: eventAsJSON(event) + "\n")
