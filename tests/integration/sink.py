"""An SMTP sink (aiosmtpd in a thread) that records envelopes and answers as scripted.

Each scripted stage takes ``None`` (accept), a reply string (always that reply), or a list
of reply strings consumed one per occurrence (then accept), so "451 once, then 250" is
``["451 4.3.0 try again"]``. The special reply ``CLOSE`` drops the connection without a
reply (at DATA: after the whole message was read, before the reply, as in RFC 1047).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

CLOSE = "CLOSE"

Scripted = str | list[str] | None


def _next(stage: Scripted) -> str | None:
    if stage is None:
        return None
    if isinstance(stage, str):
        return stage
    return stage.pop(0) if stage else None


@dataclass
class Script:
    greeting: Scripted = None        # a 4xx/5xx greeting, then the connection is closed
    mail: Scripted = None
    rcpt: Scripted | Mapping[str, Scripted] = None   # mapping: per recipient (lowercase)
    data: Scripted = None
    rset: Scripted = None            # a reply other than 250 to RSET
    pipelining: bool = True          # advertise PIPELINING (aiosmtpd copes with it anyway)
    drop_ehlo: tuple[str, ...] = ()  # EHLO keywords to hide, e.g. ("STARTTLS",)


@dataclass(frozen=True)
class SunkMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    peer: Any
    helo: str | None
    tls: bool
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]


@dataclass
class SinkState:
    script: Script = field(default_factory=Script)
    messages: list[SunkMessage] = field(default_factory=list)
    connections: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)  # (stage, argument/reply)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def note(self, stage: str, detail: str) -> None:
        with self.lock:
            self.events.append((stage, detail))
            self.lock.notify_all()


class _Handler:
    def __init__(self, state: SinkState) -> None:
        self.state = state

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.state.note("EHLO", hostname)
        script = self.state.script
        out = [r for r in responses
               if not any(r[4:].upper().startswith(k.upper()) for k in script.drop_ehlo)]
        if script.pipelining and "PIPELINING" not in script.drop_ehlo:
            out.insert(1, "250-PIPELINING")
        return out

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        reply = _next(self.state.script.mail)
        self.state.note("MAIL", address)
        if reply == CLOSE:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 closing"
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        stage = self.state.script.rcpt
        reply = _next(stage.get(address.lower()) if isinstance(stage, Mapping) else stage)
        self.state.note("RCPT", address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = _next(self.state.script.rset)
        self.state.note("RSET", reply or "250")
        return reply or "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = _next(self.state.script.data)
        self.state.note("DATA", reply or "250")
        if reply == CLOSE:
            assert server.transport is not None
            server.transport.abort()
            return "451 4.3.0 (connection already closed)"
        if reply:
            return reply
        content = envelope.original_content or envelope.content or b""
        assert isinstance(content, bytes)
        message = SunkMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            peer=session.peer,
            helo=session.host_name,
            tls=session.ssl is not None,
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
        )
        with self.state.lock:
            self.state.messages.append(message)
            self.state.lock.notify_all()
        return "250 2.0.0 Ok: sunk"


class _SinkSMTP(SMTP):
    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._state = handler.state

    async def _handle_client(self) -> None:
        with self._state.lock:
            self._state.connections += 1
        greeting = _next(self._state.script.greeting)
        if greeting:
            self._state.note("GREETING", greeting)
            if greeting != CLOSE:
                await self.push(greeting)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()


class _SinkController(Controller):
    def factory(self) -> SMTP:
        return _SinkSMTP(self.handler, **self.SMTP_kwargs)


class SMTPSink:
    """An aiosmtpd server on ``host``:``port`` recording what it accepts."""

    def __init__(self, host: str, port: int, *, script: Script | None = None,
                 tls: ssl.SSLContext | None = None, name: str = "sink.example.test",
                 data_size_limit: int = 33554432) -> None:
        self.host = host
        self.port = port
        self.state = SinkState(script=script or Script())
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["tls_context"] = tls
            kwargs["require_starttls"] = False
        self.controller = _SinkController(
            _Handler(self.state), hostname=host, port=port, server_hostname=name,
            data_size_limit=data_size_limit, ident="sink", **kwargs)
        self.started = False

    @property
    def script(self) -> Script:
        return self.state.script

    @script.setter
    def script(self, value: Script) -> None:
        self.state.script = value

    @property
    def messages(self) -> list[SunkMessage]:
        with self.state.lock:
            return list(self.state.messages)

    def start(self) -> SMTPSink:
        self.controller.start()
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.controller.stop()

    def wait_for_messages(self, count: int, timeout: float = 20.0) -> list[SunkMessage]:
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while len(self.state.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"sink {self.host}:{self.port}: {len(self.state.messages)} of {count} "
                        f"messages after {timeout}s; events {self.state.events[-20:]}")
                self.state.lock.wait(remaining)
            return list(self.state.messages)

    def wait_for_event(self, stage: str, timeout: float = 20.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        with self.state.lock:
            while True:
                for event in self.state.events:
                    if event[0] == stage:
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"sink: no {stage} after {timeout}s; "
                                         f"events {self.state.events[-20:]}")
                self.state.lock.wait(remaining)
