"""twistd's stdout log through relaygw's observer: LoggingTo and makeService's choice.

twistd asks its Application for an ILogObserver component (without --logger) before
making its own; LoggingTo sets it as twistd attaches relaygw's services. These tests
drive twistd's own pieces (ServerOptions, Application, AppLogger/UnixAppLogger) with
only the global effects (beginLoggingTo, the start-up lines) replaced.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from twisted.application.app import AppLogger
from twisted.application.service import (
    Application,
    IService,
    IServiceCollection,
    MultiService,
    Service,
)
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.scripts._twistd_unix import UnixAppLogger
from twisted.scripts.twistd import ServerOptions

from relaygw import tap
from relaygw.logs import TurnFlushedLog, classic_text, jsonLogger, stdout_observer
from relaygw.tap import LoggingTo
from test_service import CONFIG

EVENT: dict[str, Any] = {
    "text": "Q1: received from=<a@src.test>\nsecond line", "log_level": LogLevel.info,
    "log_namespace": "relaygw.mail", "log_format": "{text}", "log_time": 1_700_000_000.5,
}


def inner_services() -> MultiService:
    """Stands in for build_service's result: a MultiService with a named "gateway"."""
    top = MultiService()
    gateway = Service()
    gateway.setName("gateway")
    gateway.setServiceParent(top)
    return top


def our_observer() -> FileLogObserver:
    return FileLogObserver(io.StringIO(), classic_text)


@pytest.fixture
def begun(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """The observer lists AppLogger.start hands to globalLogBeginner, which is left alone
    (and the start-up lines, which would go to the real global log, not written)."""
    calls: list[list[Any]] = []

    def begin_logging_to(observers: list[Any], *args: Any, **kwargs: Any) -> None:
        calls.append(list(observers))

    monkeypatch.setattr(globalLogBeginner, "beginLoggingTo", begin_logging_to)
    monkeypatch.setattr(AppLogger, "_initialLog", lambda self: None)
    return calls


# --- LoggingTo ----------------------------------------------------------------------------


def test_logging_to_sets_the_applications_log_observer() -> None:
    """As twistd attaches the service, the Application gets our observer as its
    ILogObserver component, the one AppLogger looks for."""
    observer = our_observer()
    inner = inner_services()
    wrapper = LoggingTo(inner, observer)
    application = Application("relaygw")
    assert application.getComponent(ILogObserver, None) is None
    wrapper.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    assert list(IServiceCollection(application)) == [wrapper]
    assert wrapper.parent is IService(application)


def test_logging_to_keeps_the_services_as_its_child() -> None:
    """The services are started and stopped through the wrapper, and the gateway is
    still found by name in them."""
    inner = inner_services()
    gateway = inner.getServiceNamed("gateway")
    wrapper = LoggingTo(inner, our_observer())
    assert list(wrapper) == [inner]
    assert inner.parent is wrapper
    assert wrapper.observer is not None
    assert inner.getServiceNamed("gateway") is gateway
    wrapper.setServiceParent(Application("relaygw"))
    wrapper.startService()
    try:
        assert inner.running and gateway.running
    finally:
        wrapper.stopService()
    assert not inner.running and not gateway.running


def test_logging_to_attaches_to_a_parent_without_components() -> None:
    """A plain MultiService parent (no setComponent): attached all the same."""
    parent = MultiService()
    wrapper = LoggingTo(inner_services(), our_observer())
    wrapper.setServiceParent(parent)
    assert wrapper.parent is parent
    assert list(parent) == [wrapper]


@pytest.mark.parametrize("logger_class", [AppLogger, UnixAppLogger])
def test_twistds_app_logger_takes_our_observer(begun: list[list[Any]],
                                               logger_class: type[AppLogger]) -> None:
    """Without --logger, twistd's AppLogger logs to the Application's component."""
    observer = our_observer()
    application = Application("relaygw")
    LoggingTo(inner_services(), observer).setServiceParent(application)
    logger_class({"logfile": None, "logger": None, "nodaemon": True, "syslog": False}
                 ).start(application)
    assert len(begun) == 1
    [[chosen]] = begun
    assert chosen is observer


def test_twistds_logger_option_wins_over_our_observer(begun: list[list[Any]]) -> None:
    """With --logger, twistd uses that factory's observer, whatever the component."""
    theirs = our_observer()
    application = Application("relaygw")
    LoggingTo(inner_services(), our_observer()).setServiceParent(application)
    AppLogger({"logfile": None, "logger": lambda: theirs}).start(application)
    assert begun == [[theirs]]


def test_without_logging_to_twistd_makes_its_own_observer(begun: list[list[Any]]) -> None:
    """The plain services leave twistd's choice (its textFileLogObserver) alone."""
    application = Application("relaygw")
    inner_services().setServiceParent(application)
    AppLogger({"logfile": None, "logger": None}).start(application)
    [[chosen]] = begun
    assert isinstance(chosen, FileLogObserver)
    assert chosen.formatEvent is not classic_text


# --- makeService --------------------------------------------------------------------------


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "relaygw.toml"
    path.write_text(CONFIG.format(spool=tmp_path / "spool", mail=tmp_path / "mail"))
    return path


def relaygw_options(tmp_path: Path) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--config", str(config_file(tmp_path))])
    return options


def assert_plain_service(service: IService) -> None:
    assert not isinstance(service, LoggingTo)
    assert isinstance(service, MultiService)
    service.getServiceNamed("gateway")  # build_service's own top service


def test_make_service_logs_through_ours_when_twistd_logs_to_stdout(tmp_path: Path) -> None:
    """twistd -n without --logfile: makeService wraps the services in LoggingTo."""
    options = relaygw_options(tmp_path)
    options.parent = {"nodaemon": True, "logfile": None}  # type: ignore[attr-defined]
    service = tap.makeService(options)
    assert isinstance(service, LoggingTo)
    assert isinstance(service.observer, TurnFlushedLog)
    [inner] = list(service)
    assert_plain_service(inner)


@pytest.mark.parametrize("parent", [
    {"nodaemon": True, "logger": object()},
    {"nodaemon": True, "logfile": "relaygw.log"},
    {"nodaemon": False, "logfile": None},
    {"nodaemon": True, "syslog": True},
    {"nodaemon": True, "debug": True},
], ids=repr)
def test_make_service_leaves_other_logging_to_twistd(tmp_path: Path,
                                                     parent: dict[str, Any]) -> None:
    """Any other twistd logging: the plain services, and twistd's own observer."""
    options = relaygw_options(tmp_path)
    options.parent = parent  # type: ignore[attr-defined]
    assert_plain_service(tap.makeService(options))


def test_make_service_without_twistd_options(tmp_path: Path) -> None:
    """Options not parsed as twistd's subcommand (no twistd ``parent``): the plain services."""
    options = relaygw_options(tmp_path)
    assert options.parent is None
    assert_plain_service(tap.makeService(options))


def twistd_options(tmp_path: Path, *args: str) -> ServerOptions:
    """twistd's own command line: ``twistd ARGS relaygw --config FILE``."""
    options = ServerOptions()
    options.parseOptions([*args, "--pidfile=", "relaygw", "--config",
                          str(config_file(tmp_path))])
    assert options.subCommand == "relaygw"
    assert options.subOptions.parent is options
    return options


@pytest.mark.parametrize("args", [("-n",), ("--nodaemon", "--logfile=-"), ("-n", "-l", "-")],
                         ids=" ".join)
def test_twistd_command_line_to_stdout_uses_our_observer(
        tmp_path: Path, args: tuple[str, ...], begun: list[list[Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """From twistd's parsed command line to the observer its UnixAppLogger starts: ours,
    and it writes what twistd's own would."""
    options = twistd_options(tmp_path, *args)
    service = tap.makeService(options.subOptions)
    assert isinstance(service, LoggingTo)
    application = Application("relaygw")
    service.setServiceParent(application)  # what twistd's createOrGetApplication does
    UnixAppLogger(options).start(application)
    assert begun == [[service.observer]]
    service.observer(EVENT)
    assert capsys.readouterr().out == formatEventAsClassicLogText(EVENT)


@pytest.mark.parametrize("args", [
    (),  # a daemon: twistd.log, rotated on SIGUSR1
    ("-n", "--logfile", "relaygw.log"),
    ("-n", "--syslog"),
    ("-n", "--logger", "relaygw.logs.jsonLogger"),
], ids=lambda args: " ".join(args) or "daemon")
def test_twistd_command_line_elsewhere_keeps_twistds_observer(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    """twistd's other logging choices get the plain services, so no component."""
    options = twistd_options(tmp_path, *args)
    service = tap.makeService(options.subOptions)
    assert_plain_service(service)
    application = Application("relaygw")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None


def test_twistd_logger_option_is_the_factory(tmp_path: Path) -> None:
    """twistd resolves --logger to the factory before makeService sees it."""
    options = twistd_options(tmp_path, "-n", "--logger", "relaygw.logs.jsonLogger")
    assert options["logger"] is jsonLogger
    assert stdout_observer(options) is None


def test_stdout_observer_of_twistds_real_options(tmp_path: Path) -> None:
    """The keys stdout_observer reads are those twistd's ServerOptions has."""
    options = twistd_options(tmp_path, "-n")
    for key in ("nodaemon", "logfile", "logger", "syslog", "debug"):
        assert key in options, key
    assert isinstance(stdout_observer(options), TurnFlushedLog)
