"""The one place everything is wired: ``build_service(config, reactor)``.

Tests call it directly with a memory reactor or a real one; ``tap.makeService``
is a thin wrapper. Nothing here touches the filesystem before startService,
because twistd enters ``--rundir`` only after the service is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import deferLater
from twisted.logger import Logger

from relaygw.addresses import AddressError, parse_mailbox
from relaygw.auth import Authenticator, UsersFileError, load_users
from relaygw.bounce import MAX_QUOTED_HEADERS, build_bounce, header_block
from relaygw.config import Config, ConfigError, load_config
from relaygw.control import control_service
from relaygw.delivery.maildir import MaildirDeliverer
from relaygw.delivery.smtp import SMTPRelayDeliverer
from relaygw.diskthreads import DiskThreads
from relaygw.dns import build_resolver
from relaygw.envelope import Envelope, Recipient
from relaygw.interfaces import IDeliverer
from relaygw.journal import Journal
from relaygw.logs import MailLog
from relaygw.metrics import GatewayMetrics, metrics_site
from relaygw.nodelay import NoDelayListening, is_adopted
from relaygw.proxyprotocol import listener_endpoint
from relaygw.routing import Refusal, Router
from relaygw.scheduler import Scheduler
from relaygw.smtpserver import ConnectionLimiter, SMTPFactory
from relaygw.spool import BlockingRunner, MessageSource, Spool
from relaygw.spoolreader import ChildReader, Entry, ReaderFailed, SpoolReader, ThreadReader
from relaygw.startcheck import StartupError
from relaygw.syncer import journal_syncer
from relaygw.tlsserver import ServerTLS, TLSLoadError, implicit_tls_factory, load_options

SHUTDOWN_GRACE = 10.0  # seconds that deliveries in flight get at SIGTERM
CHILD_READER_MIN = 2000  # queue entries from which start-up reads them in a child process


class Gateway(Service):
    """The running gateway: spool, scheduler and the state sessions share."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any, run_blocking: BlockingRunner,
                 deliverers: dict[str, IDeliverer] | None = None,
                 disk: DiskThreads | None = None) -> None:
        self.disk = disk
        self.config = config
        self.router = Router(config)
        self.clock = reactor
        self.reactor = reactor
        self.maillog = MailLog()
        self.connections = ConnectionLimiter()
        journal = (Journal(config.queue.directory / "journal", reactor,
                           syncer=journal_syncer(reactor, config.queue.directory / "journal"))
                   if config.queue.journal else None)
        self.spool = Spool(config.queue.directory, run_blocking, journal=journal)
        if deliverers is None:
            deliverers = default_deliverers(config, reactor, run_blocking, self.spool)
        self.run_blocking = run_blocking
        self.resumed: Deferred[None] = succeed(None)  # start-up's read of the spool
        self._reader: SpoolReader | None = None  # while it runs
        self.scheduler = Scheduler(self.spool, deliverers, reactor, config.queue,
                                   bouncer=self.bounce, on_event=self.maillog.outcome)
        # Files are read in startService, inside twistd's --rundir.
        self.server_tls = ServerTLS(config.tls) if config.tls is not None else None
        self.authenticator = (Authenticator(config.auth.users_file, run_blocking)
                              if config.auth is not None else None)
        self._files_loaded = False

    def privilegedStartService(self) -> None:
        """twistd binds every listener (their privilegedStartService) before any
        service's startService: the files are read here, first (the gateway is
        the first service), so that an unusable one stops start-up before
        anything listens. twistd is in its --rundir by now."""
        self._load_files()
        super().privilegedStartService()

    def _load_files(self) -> None:
        """Certificate and users file, once (startService alone, in tests, reads
        them too)."""
        if self._files_loaded:
            return
        try:
            if self.server_tls is not None:
                self.server_tls.load()
            if self.authenticator is not None:
                self.authenticator.load()
        except (TLSLoadError, UsersFileError) as e:
            raise StartupError(f"relaygw: configuration error: {self.config.source}: {e}") \
                from None
        self._files_loaded = True

    def startService(self) -> None:
        self._load_files()
        super().startService()
        if self.disk is not None:
            self.disk.start()
        self.spool.prepare()
        entries = self.spool.scan()  # before anything is received: temp files are stale
        self.scheduler.start()
        self.resumed = Deferred.fromCoroutine(self._resume(entries))
        self.resumed.addErrback(lambda f: self.log.failure("spool: resuming the queue failed", f))

    async def _resume(self, entries: list[Entry]) -> None:
        """Read the queue back in batches while the listeners already serve: a big
        spool neither delays the banner nor blocks the reactor.

        A spool of CHILD_READER_MIN entries or more is read by a child process
        (relaygw.spoolreader: on the other core, not taking turns with the
        reactor for the GIL); a smaller one, or the rest after a child failed,
        in the disk thread pool. Until an entry is read, operator commands naming
        it are told to try again (not "no such message"). A batch that fails with
        an I/O error (EMFILE, EIO...) is tried again, with a growing pause: mail
        is never set aside for a problem of the machine's."""
        if not entries:
            return
        in_child = (len(entries) >= CHILD_READER_MIN
                    and IReactorProcess.providedBy(self.reactor))
        self.log.info("spool: resuming {count} queued messages (read {where})",
                      count=len(entries),
                      where="by a child process" if in_child else "in the disk threads")
        self.scheduler.loading = {queue_id for queue_id, _ in entries}
        count = 0
        position = 0
        pause = 1.0
        try:
            while position < len(entries) and self.running:
                try:
                    self._reader = self._start_reader(entries[position:], in_child)
                    while (batch := await self._reader.next()) is not None:
                        if not self.running:
                            return
                        self.scheduler.resume(batch.envelopes)
                        count += len(batch.envelopes)
                        position += batch.count
                        pause = 1.0
                except OSError as e:
                    self.log.error("spool: cannot read the queue back: {error}; trying again"
                                   " in {pause:.0f}s", error=e, pause=pause)
                    await deferLater(self.reactor, pause, lambda: None)
                    pause = min(2 * pause, 60.0)
                except ReaderFailed as e:
                    if self.running:  # not the child stopped by stopService
                        self.log.warn("spool: {problem}; reading the rest in threads",
                                      problem=e)
                    in_child = False
                finally:
                    if self._reader is not None:
                        self._reader.stop()
                        self._reader = None
        finally:
            self.scheduler.loading.clear()
        if self.running:
            self.log.info("spool: {count} queued messages resumed", count=count)

    def _start_reader(self, entries: list[Entry], in_child: bool) -> SpoolReader:
        if in_child:
            return ChildReader(self.reactor, self.spool, self.run_blocking, entries)
        return ThreadReader(self.spool, self.run_blocking, entries)

    def stopService(self) -> Deferred[None]:
        """SIGTERM: the listeners have stopped (they stop first); sessions finish
        their transaction in flight, deliveries in flight are recorded, within
        SHUTDOWN_GRACE; what is left then is cut (the spool stays consistent)."""
        super().stopService()
        if self._reader is not None:
            self._reader.stop()
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        deadline = self.reactor.seconds() + SHUTDOWN_GRACE
        sessions = self.connections.sessions
        for session in list(sessions):
            session.drain()
        while sessions and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        for session in list(sessions):
            session.transport.abortConnection()
        in_flight = self.scheduler.stop()
        timeout = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                         in_flight.cancel)
        try:
            await in_flight
        except CancelledError:
            self.log.warn("shutdown: deliveries still in flight were cut; they will be retried")
        if timeout.active():
            timeout.cancel()
        for deliverer in self.scheduler.deliverers.values():
            close = getattr(deliverer, "close", None)
            if close is not None:  # idle outbound connections get their QUIT
                closing = close()
                cut = self.reactor.callLater(
                    max(0.5, deadline - self.reactor.seconds()), closing.cancel)
                try:
                    await closing
                except CancelledError:
                    pass
                if cut.active():
                    cut.cancel()
        removals = self.spool.removals_finished()  # a last delete still unlinks
        cut = self.reactor.callLater(max(0.5, deadline - self.reactor.seconds()),
                                     removals.cancel)
        try:
            await removals
        except CancelledError:
            pass
        if cut.active():
            cut.cancel()
        self.spool.stop()  # the journal's last done records written
        if self.disk is not None:
            self.disk.stop()

    def reload_tls(self) -> None:
        """Re-read certificate and key (and the users file): new sessions use them.

        A file that does not load is logged and the previous one stays in use,
        so a half-renewed certificate never takes TLS away from a running gateway.
        """
        if self.server_tls is not None:
            try:
                self.server_tls.load()
            except TLSLoadError as e:
                self.log.error("reload: {error}; keeping the previous certificate", error=str(e))
        self.reload_users()

    def reload_from(self, path: str | Path | None) -> bool:
        """SIGHUP: re-read the configuration file (``None``: the embedded default).

        A file that does not load or validate is refused with one error line
        naming the file, the key and the problem; the configuration in force stays.
        """
        try:
            new = load_config(path)
        except ConfigError as e:
            self.log.error("reload refused, keeping the previous configuration: {error}",
                           error=str(e))
            return False
        return self.reload(new)

    def reload(self, new: Config) -> bool:
        """Put ``new`` in force without dropping a session; True when it was.

        Routes, aliases, ``[limits]``, ``[relay]``, ``[dns]``, ``[queue]`` limits,
        ``[tls]`` and ``[auth]`` change live. ``gateway.config`` and
        ``gateway.router`` are swapped together, in one reactor turn: a session
        in flight reads them at each command, so it sees the new routes and
        limits from its next command on (a transaction already under way keeps
        the recipients it was given). The certificate, key and users file are
        read before anything is swapped: if one fails, the whole reload is refused.
        What cannot change live (listeners, ``queue.directory``, ``[metrics]``,
        ``server.hostname``) is logged as "needs a restart: KEY" and otherwise
        ignored: the running value stays in force.
        """
        old = self.config
        effective, restart = _live_part(old, new)
        try:
            problem = _restart_conflict(effective)
            if problem:
                raise ConfigError(problem)
            tls_options = load_options(new.tls) if new.tls is not None else None
            users = load_users(new.auth.users_file) if new.auth is not None else None
        except (ConfigError, TLSLoadError, UsersFileError) as e:
            self.log.error("reload refused, keeping the previous configuration: "
                           "{source}: {error}", source=new.source, error=str(e))
            return False
        for key in restart:
            self.log.warn("reload: needs a restart: {key} (the running value stays)", key=key)
        # The swap: nothing below yields to the reactor, so no session sees half of it.
        self.config = effective
        self.router = Router(effective)
        if new.tls is None:
            self.server_tls = None
        else:
            if self.server_tls is None:
                self.server_tls = ServerTLS(new.tls)
            self.server_tls.config = new.tls
            self.server_tls.options = tls_options
        if new.auth is None or users is None:
            self.authenticator = None
        else:
            if self.authenticator is None:
                self.authenticator = Authenticator(new.auth.users_file, self.run_blocking)
            self.authenticator.path = new.auth.users_file
            self.authenticator.users = users
        self.scheduler.reconfigure(effective.queue)
        resolver = None
        for deliverer in self.scheduler.deliverers.values():
            reconfigure = getattr(deliverer, "reconfigure", None)
            if reconfigure is not None:
                if effective.dns != old.dns and resolver is None:
                    resolver = build_resolver(effective.dns, self.reactor)
                reconfigure(effective, resolver)
        self.log.info("configuration reloaded from {source}", source=new.source)
        return True

    def reload_users(self) -> None:
        if self.authenticator is not None:
            try:
                self.authenticator.load()
            except UsersFileError as e:
                self.log.error("reload: {error}; keeping the previous users", error=str(e))

    def accepted(self, envelope: Envelope) -> None:
        self.scheduler.enqueue(envelope)

    def etrn(self, domain: str) -> None:
        self.scheduler.flush(domain=domain)

    def inject(self, sender: str, recipients: list[Recipient], data: bytes) -> Deferred[str]:
        """Queue a message we generate ourselves (bounces): same spool, same rules."""
        incoming = self.spool.open_incoming()
        try:
            incoming.write(data)
        except OSError:
            self.spool.discard(incoming)
            raise
        envelope = Envelope(id=incoming.id, sender=sender, recipients=recipients,
                            received=self.clock.seconds(), client_address="127.0.0.1",
                            helo=self.config.hostname)
        d = self.spool.commit(incoming, envelope)

        def committed(_: object) -> str:
            self.maillog.received(envelope, "local")
            self.scheduler.enqueue(envelope)
            return envelope.id

        return d.addCallback(committed)

    def bounce(self, envelope: Envelope, failed: list[Recipient]) -> Deferred[object]:
        return Deferred.fromCoroutine(self._bounce(envelope, failed))

    async def _bounce(self, envelope: Envelope, failed: list[Recipient]) -> None:
        if not envelope.sender:
            return  # never bounce a bounce
        try:
            sender = parse_mailbox(envelope.sender)
        except AddressError:
            self.log.warn("{id}: cannot bounce to <{sender}>: bad address", id=envelope.id,
                          sender=envelope.sender)
            return
        routed = self.router.route_recipient(sender, trusted=True)
        if isinstance(routed, Refusal):
            self.log.warn("{id}: cannot bounce to <{sender}>: {reply}", id=envelope.id,
                          sender=envelope.sender, reply=routed.reply)
            return
        headers = await self.run_blocking(_read_headers, self.spool, envelope)
        data = build_bounce(envelope, failed, headers, self.config.hostname,
                            self.clock.seconds())
        bounce_id = await self.inject("", routed, data)
        self.maillog.bounce_queued(envelope, bounce_id)


def _live_part(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with what needs a restart kept as in ``old``, and those keys' names."""
    restart = []
    if new.listeners != old.listeners:
        restart.append("listener")
    if new.hostname != old.hostname:
        restart.append("server.hostname")
    if new.queue.directory != old.queue.directory:
        restart.append("queue.directory")
    if new.queue.journal != old.queue.journal:
        restart.append("queue.journal")
    if new.metrics != old.metrics:
        restart.append("metrics.listen")
    effective = replace(new, listeners=old.listeners, hostname=old.hostname,
                        queue=replace(new.queue, directory=old.queue.directory,
                                      journal=old.queue.journal),
                        metrics=old.metrics)
    return effective, restart


def _restart_conflict(config: Config) -> str | None:
    """What the running listeners need and the new file takes away."""
    kinds = {listener.kind for listener in config.listeners}
    if "submissions" in kinds and config.tls is None:
        return "tls: the running submissions listener needs [tls] (restart to remove it)"
    if kinds & {"submission", "submissions"} and config.auth is None:
        return "auth: the running submission listener needs [auth] (restart to remove it)"
    return None


def _read_headers(spool: Spool, envelope: Envelope) -> bytes:
    with spool.open_message(envelope) as message:
        return header_block(message.read(MAX_QUOTED_HEADERS + 4))


def default_deliverers(config: Config, reactor: Any, run_blocking: BlockingRunner,
                       source: MessageSource | None = None) -> dict[str, IDeliverer]:
    return {"local": MaildirDeliverer(config.hostname, run_blocking, source),
            "relay": relay_deliverer(config, reactor, source)}


def relay_deliverer(config: Config, reactor: Any,
                    source: MessageSource | None = None) -> IDeliverer:
    return SMTPRelayDeliverer(config, reactor, build_resolver(config.dns, reactor),
                              source=source)


class Services(MultiService):
    """build_service's top: relaygw's services, whose StartupError (a port that
    cannot be bound, an unusable certificate) becomes one line and exit 1 when
    ``nodaemon`` (SystemExit: twistd -n, tests); a daemonizing twistd (tap sets
    ``nodaemon`` False) reports the Exception itself to its parent, which
    prints it and exits 1 (SystemExit would leave that parent waiting)."""

    nodaemon = True

    def privilegedStartService(self) -> None:
        self._one_line(super().privilegedStartService)

    def startService(self) -> None:
        self._one_line(super().startService)

    def _one_line(self, start: Callable[[], None]) -> None:
        try:
            start()
        except StartupError as e:
            if self.nodaemon:
                raise SystemExit(str(e)) from None
            raise


class Listening(StreamServerEndpointService):
    """A listener whose port cannot be bound (in use, not allowed) stops start-up
    with one line naming it, not a traceback."""

    def __init__(self, endpoint: Any, factory: Any, source: str, what: str) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.source = source
        self.what = what

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if isinstance(e.socketError, OSError) \
                else e.socketError
            raise StartupError(f"relaygw: cannot listen: {self.source}: {self.what}: "
                               f"{reason}") from None


def build_service(config: Config, reactor: Any,
                  run_blocking: BlockingRunner | None = None) -> Services:
    top = Services()
    top.setName("relaygw")
    disk = None
    if run_blocking is None:
        disk = DiskThreads(reactor)
        run_blocking = disk.run
    gateway = Gateway(config, reactor, run_blocking, disk=disk)
    gateway.setName("gateway")
    gateway.setServiceParent(top)
    # After the gateway, which creates the spool directory the socket lives in.
    control_service(gateway.scheduler, config.queue.directory, reactor).setServiceParent(top)
    for listener in config.listeners:
        smtp_factory = SMTPFactory(gateway, listener.kind, listener.endpoint)
        endpoint = NoDelayListening(listener_endpoint(reactor, listener.endpoint),
                                    smtp_factory.nodelay, is_adopted(listener.endpoint))
        factory: Any = smtp_factory
        if listener.kind == "submissions":
            assert gateway.server_tls is not None  # config.py demands [tls] for it
            factory = implicit_tls_factory(gateway.server_tls, factory, reactor)
        service = Listening(endpoint, factory, config.source, f"listener {listener.endpoint}")
        service.setServiceParent(top)
    if config.metrics is not None:
        metrics = GatewayMetrics()
        metrics.bind(gateway)
        gateway.maillog.metrics = metrics
        metrics_service = Listening(
            serverFromString(reactor, config.metrics.listen), metrics_site(metrics),
            config.source, f"metrics.listen {config.metrics.listen}")
        metrics_service.setName("metrics")
        metrics_service.setServiceParent(top)
    return top
