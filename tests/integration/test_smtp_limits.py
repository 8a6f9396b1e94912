"""Connection limits and the idle timeout: 421 with the right code, then close."""

from __future__ import annotations

import contextlib
import time

import pytest

from .harness import ConnectionClosed, Daemon, DaemonFactory, RawSMTP, base_config, expect

pytestmark = pytest.mark.integration


def _connect(daemon: Daemon, source: str) -> RawSMTP:
    return daemon.raw(source=source, timeout=10)


def _refused(raw: RawSMTP) -> None:
    expect(raw.read_reply(), 421, "4.7.0")
    assert raw.wait_closed(), "421 but the connection stays open"


def _accepted_eventually(daemon: Daemon, source: str, timeout: float = 10.0) -> RawSMTP:
    """Connect until the banner is 220 (a closed slot may take a moment to be released)."""
    deadline = time.monotonic() + timeout
    reply = None
    while True:
        raw = _connect(daemon, source)
        with contextlib.suppress(ConnectionClosed):
            reply = raw.banner()
            if reply.code == 220:
                return raw
        raw.close()
        assert time.monotonic() < deadline, f"still refused after {timeout}s: {reply}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def limited(module_daemons: DaemonFactory) -> Daemon:
    config = base_config()
    config["limits"] = {"max_connections": 4, "max_connections_per_client": 2}
    return module_daemons.start(config)


def test_max_connections_per_client(limited: Daemon) -> None:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(_connect(limited, "127.0.0.5"))
        second = stack.enter_context(_connect(limited, "127.0.0.5"))
        assert first.banner().code == 220 and second.banner().code == 220
        third = stack.enter_context(_connect(limited, "127.0.0.5"))
        _refused(third)
        other = stack.enter_context(_connect(limited, "127.0.0.6"))
        assert other.banner().code == 220, "another client is not limited by 127.0.0.5's count"
        assert first.cmd("NOOP").code == 250, "the refusal disturbed an existing session"
        expect(first.cmd("QUIT"), 221)
        first.wait_closed()
        stack.enter_context(_accepted_eventually(limited, "127.0.0.5"))


def test_max_connections(limited: Daemon) -> None:
    with contextlib.ExitStack() as stack:
        held = []
        for source in ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"):
            # slots of the previous test's connections may take a moment to be released
            held.append(stack.enter_context(_accepted_eventually(limited, source)))
        _refused(stack.enter_context(_connect(limited, "127.0.0.15")))
        held[0].close()
        stack.enter_context(_accepted_eventually(limited, "127.0.0.15"))


def test_command_timeout(daemons: DaemonFactory) -> None:
    config = base_config()
    config["limits"] = {"command_timeout": "1s"}
    daemon = daemons.start(config)
    with daemon.raw(source="127.0.0.5") as raw:
        assert raw.banner().code == 220
        raw.ehlo()
        started = time.monotonic()
        reply = raw.read_reply(timeout=10)
        waited = time.monotonic() - started
        expect(reply, 421, "4.4.2")
        assert raw.wait_closed(), "421 but the connection stays open"
        assert 0.8 <= waited <= 5, f"timed out after {waited:.1f}s for a 1s command_timeout"
    with daemon.raw(source="127.0.0.5") as raw:  # also before any command
        assert raw.banner().code == 220
        expect(raw.read_reply(timeout=10), 421, "4.4.2")
        assert raw.wait_closed()
