"""Relay delivery end to end (CONTRACT.md section 4): the real daemon, sinks, DNS, a test CA.

Each test starts its own ``twistd relaygw`` (the ``daemons`` fixture), aiosmtpd sinks on
127.0.0.2-9 (``sink_factory``) and, where routing is by MX, the twisted.names server
(``dns_server``). A next hop that is "down" is an address and port nothing listens on.
Bounces go to the local sender owner@example.test, whose Maildir the tests read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from .conftest import SinkFactory
from .dnsfixture import DNSServer
from .harness import (
    HOSTNAME,
    Daemon,
    DaemonFactory,
    barrier,
    pick_common_port,
    pick_port,
    wait_for,
)
from .relay_helpers import (
    OWNER,
    assert_failed_block,
    check_bounce_envelope,
    mail_log_lines,
    other_mail,
    owner_files,
    queue_list,
    relay_config,
    send,
    sink_events,
    smarthost_route,
    sunk_message_id,
    wait_bounces,
    wait_queue_empty,
    wait_queue_recipient,
)
from .sink import CLOSE, Script, SMTPSink
from .tlsutil import TestCA

pytestmark = pytest.mark.integration

SMARTHOST = "127.0.0.3"


def _received_by_us(content: bytes, queue_id: str) -> str:
    """The first header is relaygw's Received: (it prepends); return it unfolded."""
    head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    first = unfolded.split("\r\n", 1)[0]
    assert first.lower().startswith("received:"), f"first header is not Received: {first!r}"
    assert re.search(rf"\bby {re.escape(HOSTNAME)}\b", first), first
    assert queue_id in first, first
    return first


# --- smarthost, many recipients ------------------------------------------------------------


def test_smarthost_one_transaction_for_many_recipients(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST)
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    rcpts = [f"user{i}@smart.test" for i in range(5)]
    # dot-stuffing on both legs: a lone ".", leading dots, a line that is ".." already
    body = ("first line\r\n.leading dot\r\n..two dots\r\n.\r\n"
            " .not leading\r\nlast line\r\n")
    sent = send(daemon, rcpts, body=body)

    (got,) = sink.wait_for_messages(1)
    wait_queue_empty(daemon)
    assert len(sink_events(sink, "MAIL")) == 1, sink.state.events
    assert got.mail_from == OWNER
    assert sorted(got.rcpt_tos) == sorted(rcpts)
    assert got.helo == HOSTNAME
    _received_by_us(got.content, sent.queue_id)
    # everything after relaygw's header is the client's message, byte for byte
    assert got.content.endswith(sent.data), got.content
    assert got.content.split(b"\r\n\r\n", 1)[1] == body.encode()
    assert sunk_message_id(got) == sent.message_id
    daemon.wait_log(sent.queue_id, "user0@smart.test", "delivered")


# --- MX routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["down", "421-greeting"])
def test_mx_preference_first_unusable_delivers_to_second(
        daemons: DaemonFactory, sink_factory: SinkFactory, dns_server: DNSServer,
        first: str) -> None:
    port = pick_common_port(["127.0.0.2", "127.0.0.3"])
    dns_server.start({
        "pref.test": {"MX": [[20, "mx2.pref.test"], [10, "mx1.pref.test"]]},
        "mx1.pref.test": {"A": ["127.0.0.2"]},   # preferred: down, or busy
        "mx2.pref.test": {"A": ["127.0.0.3"]},
    })
    busy = None
    if first == "421-greeting":
        busy = sink_factory("127.0.0.2", port, script=Script(greeting="421 4.3.2 busy"))
    sink = sink_factory("127.0.0.3", port)
    daemon = daemons.start(relay_config(nameserver=dns_server.nameserver, mx_port=port))
    sent = send(daemon, ["someone@pref.test"])

    (got,) = sink.wait_for_messages(1)
    assert got.rcpt_tos == ("someone@pref.test",)
    assert sunk_message_id(got) == sent.message_id
    line = daemon.wait_log(sent.queue_id, "someone@pref.test", "delivered")
    assert "mx2.pref.test" in line, line
    wait_queue_empty(daemon)
    if busy is not None:  # the preferred one was tried first, and only greeted us
        assert busy.state.connections >= 1
        assert sink_events(busy, "EHLO") == []
    assert len(mail_log_lines(daemon, sent.queue_id, "deferred")) == 0


def test_implicit_mx_uses_the_domain_address(
        daemons: DaemonFactory, sink_factory: SinkFactory, dns_server: DNSServer) -> None:
    dns_server.start({"nomx.test": {"A": ["127.0.0.4"]}})
    sink = sink_factory("127.0.0.4")
    daemon = daemons.start(relay_config(nameserver=dns_server.nameserver, mx_port=sink.port))
    sent = send(daemon, ["someone@nomx.test"])

    (got,) = sink.wait_for_messages(1)
    assert got.rcpt_tos == ("someone@nomx.test",)
    assert sunk_message_id(got) == sent.message_id
    wait_queue_empty(daemon)


@pytest.mark.parametrize(("domain", "status"), [
    ("nullmx.test", "5.1.10"),
    ("nxdomain.test", "5.1.2"),
], ids=["null-mx", "nxdomain"])
def test_null_mx_and_nxdomain_bounce_at_once(
        daemons: DaemonFactory, dns_server: DNSServer, domain: str, status: str) -> None:
    dns_server.start({"nullmx.test": {"MX": [[0, "."]]}})
    # A retry an hour away: a bounce within the deadline can only come from the first try.
    daemon = daemons.start(relay_config(nameserver=dns_server.nameserver, retry=["1h"],
                                        mx_port=pick_port()))
    rcpt = f"someone@{domain}"
    sent = send(daemon, [rcpt])

    (path,) = wait_bounces(daemon, 1)
    bounce = check_bounce_envelope(path)
    (block,) = bounce.per_recipient
    assert_failed_block(block, rcpt, status)
    assert sent.message_id in bounce.headers_text
    assert str(bounce.per_message["X-Relaygw-Queue-ID"]).strip() == sent.queue_id
    wait_queue_empty(daemon)
    barrier(daemon)
    assert len(owner_files(daemon)) == 1, "more than one bounce"


def test_dns_timeout_defers(daemons: DaemonFactory, dns_server: DNSServer) -> None:
    # (Not SERVFAIL: dnsfixture's "servfail" names get NXDOMAIN, as twisted.names' server
    # answers ENAME for any DomainError, and error.DNSServerError is one.)
    dns_server.start({}, timeout=["slow.test"])
    daemon = daemons.start(relay_config(nameserver=dns_server.nameserver, mx_port=pick_port()))
    sent = send(daemon, ["someone@slow.test"])

    rcpt = wait_queue_recipient(daemon, sent.queue_id, "someone@slow.test",
                                lambda r: r["state"] == "deferred" and bool(r["last_error"]))
    assert "4.4.3" in (rcpt["last_error"] or ""), rcpt
    assert owner_files(daemon) == [], "a DNS failure was bounced"
    assert not mail_log_lines(daemon, sent.queue_id, "bounced")


# --- remote replies ---------------------------------------------------------------------------


TRY_AGAIN = "451 4.3.0 try again later"


@pytest.mark.parametrize(("stage", "script", "tries"), [
    ("RCPT", lambda: Script(rcpt=[TRY_AGAIN, TRY_AGAIN]), 3),
    ("DATA", lambda: Script(data=[TRY_AGAIN, TRY_AGAIN]), 3),
    # RFC 1047: the connection breaks after the final dot, before the reply
    ("DATA", lambda: Script(data=[CLOSE]), 2),
], ids=["rcpt-4xx-twice", "data-4xx-twice", "data-connection-lost"])
def test_transient_failure_then_delivered_once(
        daemons: DaemonFactory, sink_factory: SinkFactory, stage: str,
        script: Callable[[], Script], tries: int) -> None:
    sink = sink_factory(SMARTHOST, script=script())
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    sent = send(daemon, ["someone@smart.test"])

    (got,) = sink.wait_for_messages(1, timeout=30)
    assert sunk_message_id(got) == sent.message_id
    wait_queue_empty(daemon)
    barrier(daemon)
    assert len(sink.messages) == 1
    assert len(sink_events(sink, stage)) == tries, sink.state.events
    assert len(mail_log_lines(daemon, sent.queue_id, "deferred")) == tries - 1
    assert owner_files(daemon) == [], "a transient failure was bounced"


def test_permanent_failure_of_one_recipient_bounces_only_it(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST, script=Script(
        rcpt={"bad@smart.test": "550 5.1.1 <bad@smart.test>: no such user"}))
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    sent = send(daemon, ["good@smart.test", "bad@smart.test"])

    (got,) = sink.wait_for_messages(1)
    assert got.rcpt_tos == ("good@smart.test",)
    (path,) = wait_bounces(daemon, 1)
    bounce = check_bounce_envelope(path)
    (block,) = bounce.per_recipient
    assert_failed_block(block, "bad@smart.test", "5.1.1")
    assert "no such user" in str(block["Diagnostic-Code"]), block.items()
    assert sent.message_id in bounce.headers_text
    wait_queue_empty(daemon)
    barrier(daemon)
    assert len(owner_files(daemon)) == 1
    assert len(sink.messages) == 1


def test_mixed_replies_in_one_transaction(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST, script=Script(rcpt={
        "bad1@smart.test": "550 5.1.1 no such user",
        "bad2@smart.test": "553 5.1.3 bad address",
        "later@smart.test": [TRY_AGAIN],
    }))
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    rcpts = ["good1@smart.test", "bad1@smart.test", "later@smart.test", "bad2@smart.test",
             "good2@smart.test"]
    send(daemon, rcpts)

    first, second = sink.wait_for_messages(2, timeout=30)
    assert first.rcpt_tos == ("good1@smart.test", "good2@smart.test")
    assert second.rcpt_tos == ("later@smart.test",)  # only the deferred one is retried
    (path,) = wait_bounces(daemon, 1)
    bounce = check_bounce_envelope(path)
    assert len(bounce.per_recipient) == 2, [b.items() for b in bounce.per_recipient]
    assert_failed_block(bounce.recipient("bad1@smart.test"), "bad1@smart.test", "5.1.1")
    assert_failed_block(bounce.recipient("bad2@smart.test"), "bad2@smart.test", "5.1.3")
    wait_queue_empty(daemon)
    barrier(daemon)
    assert len(owner_files(daemon)) == 1
    assert len(sink.messages) == 2


def test_max_age_with_next_hop_down_bounces_4_4_7(daemons: DaemonFactory) -> None:
    down = pick_port(SMARTHOST)  # nothing listens there
    daemon = daemons.start(relay_config(
        routes=[smarthost_route("smart.test", SMARTHOST, down)], max_age="3s"))
    sent = send(daemon, ["someone@smart.test"])

    daemon.wait_log(sent.queue_id, "someone@smart.test", "deferred")
    (path,) = wait_bounces(daemon, 1, timeout=30)
    bounce = check_bounce_envelope(path)
    (block,) = bounce.per_recipient
    assert_failed_block(block, "someone@smart.test", "4.4.7")
    assert sent.message_id in bounce.headers_text
    wait_queue_empty(daemon)


def test_null_sender_permanent_failure_never_bounces(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST, script=Script(rcpt="550 5.1.1 no such user"))
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    sent = send(daemon, ["someone@smart.test"], sender="")

    daemon.wait_log(sent.queue_id, "someone@smart.test", "bounced")
    wait_queue_empty(daemon)
    barrier(daemon)
    assert other_mail(daemon) == [], "a bounce of a bounce was delivered"
    assert not mail_log_lines(daemon, sent.queue_id, "non-delivery notification")
    assert len(sink_events(sink, "MAIL")) == 1, sink.state.events  # nothing relayed either
    assert sink.messages == []


# --- outbound TLS -----------------------------------------------------------------------------


def test_tls_required_without_starttls_stays_deferred(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST)  # no TLS context: no STARTTLS in EHLO
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port, tls="required")]))
    sent = send(daemon, ["someone@smart.test"])

    wait_for(lambda: sink.state.connections >= 2, 20, "a retry to the smarthost",
             interval=0.1)  # tried, and tried again: it stays deferred
    rcpt = wait_queue_recipient(daemon, sent.queue_id, "someone@smart.test",
                                lambda r: r["state"] == "deferred" and bool(r["last_error"]))
    assert "tls" in rcpt["last_error"].lower(), rcpt
    assert sink.messages == []
    assert sink_events(sink, "MAIL") == [], "MAIL sent to a hop without TLS"
    assert owner_files(daemon) == []


def test_routes_sharing_a_smarthost_keep_their_own_tls_policy(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    sink = sink_factory(SMARTHOST)  # no STARTTLS
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("secure.test", SMARTHOST, sink.port, tls="required"),
        smarthost_route("plain.test", SMARTHOST, sink.port, tls="none")]))
    sent = send(daemon, ["x@plain.test", "y@secure.test"])

    (got,) = sink.wait_for_messages(1)
    assert got.rcpt_tos == ("x@plain.test",)
    rcpt = wait_queue_recipient(daemon, sent.queue_id, "y@secure.test",
                                lambda r: r["state"] == "deferred" and bool(r["last_error"]))
    assert "tls" in (rcpt["last_error"] or "").lower(), rcpt
    assert sink_events(sink, "RCPT") == ["x@plain.test"], "sent in clear despite tls=required"


def test_tls_verify_right_name_delivered_wrong_name_deferred(
        daemons: DaemonFactory, sink_factory: SinkFactory, dns_server: DNSServer,
        test_ca: TestCA) -> None:
    port = pick_common_port(["127.0.0.4", "127.0.0.5"])
    dns_server.start({
        "good.test": {"MX": [[10, "mx.good.test"]]},
        "mx.good.test": {"A": ["127.0.0.4"]},
        "bad.test": {"MX": [[10, "mx.bad.test"]]},
        "mx.bad.test": {"A": ["127.0.0.5"]},
        "opportunistic.test": {"MX": [[10, "mx.bad.test"]]},
    })
    good = sink_factory("127.0.0.4", port, tls=test_ca.issue(["mx.good.test"]).server_context())
    bad = sink_factory("127.0.0.5", port,
                       tls=test_ca.issue(["other.example.net"]).server_context())
    by_ip = sink_factory("127.0.0.6", tls=test_ca.issue([], ips=["127.0.0.6"]).server_context())
    verify = {"tls": "verify", "ca_file": str(test_ca.ca_pem)}
    daemon = daemons.start(relay_config(
        nameserver=dns_server.nameserver, mx_port=port,
        routes=[{"domains": ["good.test", "bad.test"], "action": "relay", **verify},
                smarthost_route("ip.test", "127.0.0.6", by_ip.port, **verify)]))
    ok = send(daemon, ["someone@good.test"])
    nok = send(daemon, ["someone@bad.test"])
    literal = send(daemon, ["someone@ip.test"])
    opportunistic = send(daemon, ["someone@opportunistic.test"])  # the default policy

    (got,) = good.wait_for_messages(1)
    assert got.tls
    assert sunk_message_id(got) == ok.message_id
    (got,) = by_ip.wait_for_messages(1)  # the smarthost's name is its address: IP SAN
    assert got.tls
    assert sunk_message_id(got) == literal.message_id
    (got,) = bad.wait_for_messages(1)  # opportunistic: encrypted, the name not checked
    assert got.tls
    assert sunk_message_id(got) == opportunistic.message_id
    rcpt = wait_queue_recipient(daemon, nok.queue_id, "someone@bad.test",
                                lambda r: r["state"] == "deferred" and bool(r["last_error"]))
    assert "tls" in (rcpt["last_error"] or "").lower(), rcpt
    assert sink_events(bad, "RCPT") == ["someone@opportunistic.test"], \
        "RCPT sent over an unverified connection"
    assert owner_files(daemon) == []
    done = {ok.queue_id, literal.queue_id, opportunistic.queue_id}
    wait_for(lambda: not done & {e["id"] for e in queue_list(daemon)}, 20,
             "the delivered messages to leave the queue", interval=0.2)


# --- connection reuse ---------------------------------------------------------------------


def _relay_in_a_row(daemons: DaemonFactory, sink: SMTPSink, count: int) -> Daemon:
    """``count`` messages, one after the other, through a relaygw whose route for
    smart.test is ``sink``; returns once each has arrived exactly once."""
    daemon = daemons.start(relay_config(routes=[
        smarthost_route("smart.test", SMARTHOST, sink.port)]))
    sent = [send(daemon, [f"user{i}@smart.test"]).message_id for i in range(count)]
    sink.wait_for_messages(count)
    wait_queue_empty(daemon)
    assert sorted(sunk_message_id(m) for m in sink.messages) == sorted(sent)
    return daemon


def test_steady_traffic_reuses_the_session_with_rset_in_the_pipelined_group(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    """Messages one after the other to a smarthost share sessions; each reuse
    starts with RSET (pipelined with MAIL, RCPT and DATA), and every message
    arrives exactly once."""
    sink = sink_factory(SMARTHOST)
    _relay_in_a_row(daemons, sink, 12)
    assert sink.state.connections < 12, sink.state.connections
    assert len(sink_events(sink, "RSET")) >= 1
    assert len(sink_events(sink, "MAIL")) == 12  # no transaction begun twice


def test_a_refused_rset_on_a_reused_session_costs_nothing(
        daemons: DaemonFactory, sink_factory: SinkFactory) -> None:
    """The sink refuses the first RSET (as a server that timed the session out
    would): relaygw drops that session before sending any of the message and
    delivers on a fresh one; nothing is deferred, nothing arrives twice."""
    sink = sink_factory(SMARTHOST, script=Script(rset=["421 4.4.2 idle too long"]))
    daemon = _relay_in_a_row(daemons, sink, 8)
    rsets = sink_events(sink, "RSET")
    assert rsets and rsets[0].startswith("421"), rsets
    assert sink.state.connections >= 2  # the refused session was replaced
    assert mail_log_lines(daemon, "status=deferred") == []
