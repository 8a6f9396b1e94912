"""twistd -n logging to stdout: relaygw's observer writes twistd's classic lines."""

from __future__ import annotations

import re

import pytest

from .harness import DaemonFactory, base_config, make_message, send_smtplib, wait_for

pytestmark = pytest.mark.integration

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
MAIL = re.escape("[relaygw.logs.MailLog#info]")
APP_LOGGER = re.escape("twisted.scripts._twistd_unix.UnixAppLogger")


def test_stdout_lines_are_twistds_classic_format(daemons: DaemonFactory) -> None:
    """The mail log and twistd's own lines share one format on stdout: time stamp,
    [namespace#level] or [system], text; continuation lines indented by a tab."""
    daemon = daemons.start(base_config(mailboxes=["alice"]))
    message = make_message("s@remote.test", ["alice@example.test"])
    with daemon.smtp() as smtp:
        queue_id = send_smtplib(smtp, "s@remote.test", ["alice@example.test"], message)
    received = re.compile(
        rf"^{STAMP} {MAIL} {re.escape(queue_id)}: received from=<s@remote\.test>,"
        r" size=\d+, nrcpt=1, client=127\.0\.0\.1$", re.MULTILINE)
    delivered = re.compile(
        rf"^{STAMP} {MAIL} {re.escape(queue_id)}: to=<alice@example\.test>,"
        r" relay=local, .*status=delivered", re.MULTILINE)

    def stdout() -> str | None:
        text = daemon.stdout_path.read_text(errors="replace")
        return text if received.search(text) and delivered.search(text) else None

    text = wait_for(stdout, 20, lambda: daemon.output()[-3000:])
    assert re.search(rf"^{STAMP} \[{APP_LOGGER}#info\] twistd \S+ \(.+\) starting up\.$", text,
                     re.MULTILINE), text[-3000:]
    assert re.search(rf"^{STAMP} \[{APP_LOGGER}#info\] reactor class: \S+\.$", text, re.MULTILINE)
    for line in text.splitlines():  # every line is a log line, a continuation or the marker
        assert (re.match(rf"{STAMP} \[[^\]]*\] ", line) or line.startswith("\t")
                or line.startswith("===== relaygw harness")), line


@pytest.mark.parametrize(("reactor_args", "reactor_class"), [
    ([], "relaygw.reactor.RelayReactor"),
    (["-r", "poll"], "twisted.internet.pollreactor.PollReactor"),
], ids=["default", "twistd-r"])
def test_relaygw_runs_its_epoll_reactor_unless_twistd_is_given_one(
        daemons: DaemonFactory, reactor_args: list[str], reactor_class: str) -> None:
    """relaygw.reactor: the default reactor, and an operator's ``twistd -r`` stands;
    mail flows through either."""
    daemon = daemons.prepare(base_config(mailboxes=["alice"]))
    default_command = daemon.command
    daemon.command = lambda: [default_command()[0], *reactor_args, *default_command()[1:]]
    daemon.start()
    message = make_message("s@remote.test", ["alice@example.test"])
    with daemon.smtp() as smtp:
        send_smtplib(smtp, "s@remote.test", ["alice@example.test"], message)
    wait_for(lambda: list((daemon.maildir("example.test", "alice") / "new").glob("*")) or None,
             20, lambda: daemon.output()[-3000:])
    assert f"reactor class: {reactor_class}." in daemon.stdout_path.read_text()
