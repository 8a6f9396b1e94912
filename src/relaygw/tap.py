"""``twistd relaygw``: command-line options and makeService."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.app import ServerOptions
from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from relaygw.config import Config, ConfigError, load_config
from relaygw.logs import stdout_observer
from relaygw.startcheck import check_files


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the relaygw SMTP relay. Without --config it uses the embedded default:"
                " an smtp listener on 127.0.0.1:2525, local delivery for 'localhost' into"
                " ./var/mail, relay by MX for clients in 127.0.0.0/8 and ::1.")
    optParameters = [["config", "c", None, "TOML configuration file"]]

    loaded: Config

    def postOptions(self) -> None:
        parent = getattr(self, "parent", None)
        rundir = parent.get("rundir", ".") if isinstance(parent, ServerOptions) else "."
        try:
            self.loaded = load_config(self["config"])
            check_files(self.loaded, rundir)
        except ConfigError as e:
            # One line and a non-zero exit, before anything listens.
            raise SystemExit(f"relaygw: configuration error: {e}") from None


def makeService(options: Options) -> IService:
    parent = getattr(options, "parent", None)
    by_twistd = isinstance(parent, ServerOptions)
    if by_twistd:
        _install_reactor()  # run by twistd: not for tests or an embedding program
    from twisted.internet import reactor

    from relaygw.service import build_service

    reactor.callWhenRunning(_stop_cleanly_on_sigterm, reactor)
    top = build_service(options.loaded, reactor)
    # One-line start-up errors unless a daemonizing twistd reports them (Services).
    top.nodaemon = not by_twistd or bool(parent.get("nodaemon", True))
    # Made absolute now: twistd enters --rundir after makeService, and a relative
    # --config must still name the same file at SIGHUP.
    path = os.path.abspath(options["config"]) if options["config"] is not None else None
    reactor.callWhenRunning(_reload_on_sighup, reactor, top.getServiceNamed("gateway"), path)
    observer = stdout_observer(parent)
    service = top if observer is None else LoggingTo(top, observer)
    if by_twistd:
        from relaygw import gctune

        gctune.tune()  # last: what start-up made is frozen
    return service


def _install_reactor() -> None:
    """relaygw's epoll reactor (``relaygw.reactor``), unless twistd was given one
    with ``-r`` or something installed one already; twistd's default where there
    is no epoll."""
    try:
        from relaygw.reactor import install_if_none
    except ImportError:  # no select.epoll on this platform
        return
    install_if_none()


class LoggingTo(MultiService):
    """relaygw's services, which, as twistd attaches them to its application, set
    the application's log observer: twistd then logs to stdout through it instead
    of its own (same lines, formatted faster: ``relaygw.logs.classic_text``).
    twistd consults the application only without ``--logger``, and
    ``stdout_observer`` gives an observer only where twistd would log to stdout."""

    def __init__(self, services: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        services.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:  # twistd's Application (Componentized)
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)


def _stop_cleanly_on_sigterm(reactor: Any) -> None:
    """An operator's stop is a clean shutdown that exits 0 (as ``postfix stop`` does),
    not, as twistd would report it, a death by SIGTERM."""

    def stop() -> None:
        Logger().info("received SIGTERM: stopping after the work in flight")
        reactor.stop()

    def on_sigterm(number: int, frame: object) -> None:
        # Nothing but the hand-off here: a handler runs between any two bytecodes
        # of the reactor's thread, even inside the log observer.
        reactor.callFromThread(stop)

    signal.signal(signal.SIGTERM, on_sigterm)


def _reload_on_sighup(reactor: Any, gateway: Any, path: str | None) -> None:
    """SIGHUP re-reads the configuration file given with --config (without it, the
    embedded default), the TLS certificate and key and the users file, and puts
    them in force without dropping a session (see ``Gateway.reload``). A file that
    fails validation is refused with one error line; the running one stays."""

    def reload() -> None:
        Logger().info("received SIGHUP: reloading the configuration")
        gateway.reload_from(path)

    def on_sighup(number: int, frame: object) -> None:
        reactor.callFromThread(reload)  # as for SIGTERM: nothing else in the handler

    signal.signal(signal.SIGHUP, on_sighup)
