"""The classic open-relay probes, as an outsider would run them against the real daemon.

From an untrusted address (127.0.0.5; only 127.0.0.1 is trusted) every probe
is refused at RCPT or stays a local address; nothing is ever queued for
another domain, and a sink standing in for the outside world sees nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import Daemon, DaemonFactory, base_config, expect

pytestmark = pytest.mark.integration

UNTRUSTED = "127.0.0.5"

# (probe, expected code, expected enhanced code)
PROBES = [
    ("victim@outside.test", 554, "5.7.1"),                  # plain relay attempt
    ("victim%outside.test@example.test", 550, "5.1.1"),     # percent hack: a local name
    ('"victim@outside.test"@example.test', 550, "5.1.1"),   # quoted @: a local name
    ("@example.test:victim@outside.test", 554, "5.7.1"),    # source route: ignored
    ("@example.test,@other.test:victim@outside.test", 554, "5.7.1"),
    ("victim@outside.test@example.test", 501, "5.1.3"),     # two @: not an address
    ("victim!outside.test@example.test", 550, "5.1.1"),     # bang path: a local name
    ("victim@[127.0.0.9]", 554, "5.7.1"),                   # address literal
    ("victim@outside.test.", 554, "5.7.1"),                 # trailing dot
    ("victim@example.test.outside.test", 554, "5.7.1"),     # our name as a prefix
    ("victim@OUTSIDE.TEST", 554, "5.7.1"),
]


@pytest.fixture(scope="module")
def daemon(module_daemons: DaemonFactory) -> Daemon:
    return module_daemons.start(base_config(trusted=["127.0.0.1/32"], mailboxes=["alice"]))


@pytest.mark.parametrize(("probe", "code", "enhanced"), PROBES, ids=[p[0] for p in PROBES])
def test_probe_is_refused(daemon: Daemon, probe: str, code: int, enhanced: str) -> None:
    with daemon.raw(source=UNTRUSTED) as raw:
        raw.banner()
        raw.ehlo("probe.example.net")
        expect(raw.cmd("MAIL FROM:<spammer@example.net>"), 250)
        expect(raw.cmd(f"RCPT TO:<{probe}>"), code, enhanced)
        expect(raw.cmd("DATA"), 554, "5.5.1")  # every recipient refused (as Postfix)
        raw.cmd("QUIT")
        raw.check_enhanced_codes()


def test_nothing_was_queued(daemon: Daemon) -> None:
    for probe, _, _ in PROBES:  # run them all again in one session, then look at the queue
        with daemon.raw(source=UNTRUSTED) as raw:
            raw.banner()
            raw.ehlo("probe.example.net")
            raw.cmd("MAIL FROM:<spammer@example.net>")
            raw.cmd(f"RCPT TO:<{probe}>")
            raw.cmd("DATA")
            raw.send(b"Subject: relay test\r\n\r\nrelayed?\r\n.\r\n")
            raw.cmd("QUIT")
    relaygwctl = Path(sys.executable).parent / "relaygwctl"
    assert daemon.config_path is not None
    listing = subprocess.run([str(relaygwctl), "--config", str(daemon.config_path), "queue",
                              "list", "--json"], cwd=daemon.run_dir, capture_output=True,
                             text=True, check=True)
    assert json.loads(listing.stdout) == []
    assert daemon.delivered() == []
