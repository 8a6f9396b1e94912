"""relaygwctl: the operator's tool (check, route, queue, passwd).

Exit status: 0 success, 1 a failure explained in one line, 2 bad usage
(argparse's own convention). ``--config FILE`` may stand before or after the
subcommand. ``queue list`` and ``queue show`` ask the running daemon (its
envelopes in memory, deliveries in flight included) and read the spool directly
when none runs. ``route`` looks up MX records itself, synchronously, with the
``[dns]`` nameservers and timeout. ``queue flush``,
``hold``, ``release`` and ``delete`` ask the running daemon over its control
socket (relaygw.control); with no daemon running, ``hold``, ``release`` and
``delete`` change the spool files themselves (nothing else uses them then).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.resolver
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectError
from twisted.internet.task import react

from relaygw.addresses import AddressError, parse_mailbox
from relaygw.aliases import expand
from relaygw.auth import UsersFileError, check_username, hash_password, set_password
from relaygw.config import Config, ConfigError, load_config
from relaygw.control import (
    BadQueueId,
    Delete,
    Flush,
    Hold,
    ListQueue,
    Release,
    ShowMessage,
    call,
    socket_path,
)
from relaygw.dns import (
    DNSError,
    NXDomain,
    address_literal,
    blocking_lookup,
    configured_resolver,
)
from relaygw.envelope import Envelope
from relaygw.queuefile import is_queue_id
from relaygw.queueview import parse_rfc3339, queue_listing, show_entry
from relaygw.routing import Refusal, Router
from relaygw.scheduler import MessageHeld, UnknownMessage
from relaygw.spool import Spool
from relaygw.startcheck import check_files


class Failure(Exception):
    """A one-line explanation; exit status 1."""


def cmd_check(config: Config, args: argparse.Namespace) -> None:
    check_files(config)  # relative paths: from here, as twistd's --rundir would be
    print(f"config: {config.source}: ok")
    print(f"hostname: {config.hostname}")
    for listener in config.listeners:
        print(f"listener: {listener.endpoint} ({listener.kind})")
    limits = config.limits
    print(f"limits: max_message_size={limits.max_message_size} "
          f"max_recipients={limits.max_recipients} max_connections={limits.max_connections} "
          f"max_connections_per_client={limits.max_connections_per_client} "
          f"command_timeout={limits.command_timeout:g}s max_hops={limits.max_hops}")
    print("trusted_networks: " + ", ".join(str(n) for n in config.relay.trusted_networks))
    if config.tls is not None:
        print(f"tls: certificate={config.tls.certificate} private_key={config.tls.private_key}")
    if config.auth is not None:
        print(f"auth: users_file={config.auth.users_file} "
              f"require_tls={str(config.auth.require_tls).lower()}")
    queue = config.queue
    print(f"queue: {queue.directory} retry_schedule="
          + ",".join(f"{d:g}s" for d in queue.retry_schedule)
          + f" max_age={queue.max_age:g}s concurrency={queue.concurrency}"
          f" per_destination={queue.per_destination}")
    for index, route in enumerate(config.routes, 1):
        detail = ""
        if route.action == "local":
            detail = f" maildir={route.maildir}"
            if route.mailboxes is not None:
                detail += " mailboxes=" + ",".join(sorted(route.mailboxes))
        elif route.action == "relay":
            hop = f"{route.via[0]}:{route.via[1]}" if route.via else "MX"
            detail = f" via={hop} tls={route.tls or config.relay.tls}"
        print(f"route {index}: {','.join(route.domains)} -> {route.action}"
              f" (accept_from={route.accept_from}){detail}")
    for key, targets in config.aliases.items():
        print(f"alias: {key} -> {', '.join(targets)}")


def cmd_route(config: Config, args: argparse.Namespace) -> None:
    try:
        mailbox = parse_mailbox(args.address)
    except AddressError as e:
        raise Failure(f"bad address {args.address!r}: {e}") from None
    router = Router(config)
    next_hops: dict[str, tuple[tuple[str, int] | None, str]] = {}
    try:
        targets = expand(config.aliases, mailbox)
    except AddressError as e:
        raise Failure(f"{mailbox}: an alias makes a bad address: {e}") from None
    if targets is not None:
        print(f"aliases: {mailbox} -> {', '.join(str(t) for t in targets)}")
    for trusted in (True, False):
        who = "trusted client" if trusted else "untrusted client"
        outcome = router.route_recipient(mailbox, trusted)
        if isinstance(outcome, Refusal):
            print(f"{who}: refused at RCPT: {outcome.reply}")
            continue
        for recipient in outcome:
            route = router.find_route(recipient.domain)
            assert route is not None
            index = config.routes.index(route) + 1
            line = f"{who}: {recipient.address}: route {index} ({','.join(route.domains)})"
            if recipient.action == "local":
                line += f" -> local maildir {recipient.maildir}"
            else:
                hop = (f"smarthost {route.via[0]}:{route.via[1]}" if route.via
                       else f"MX lookup for {recipient.domain} (port {config.relay.mx_port})")
                line += f" -> relay via {hop}, tls {route.tls or config.relay.tls}"
                if recipient.domain not in next_hops:
                    next_hops[recipient.domain] = (route.via, route.tls or config.relay.tls)
            print(line)
    resolver: dns.resolver.Resolver | None = None
    for domain, (via, tls) in next_hops.items():
        if via is not None:
            print(f"next hop for {domain}: smarthost {via[0]}:{via[1]}, tls {tls}")
            continue
        print(f"next hop for {domain}: MX, port {config.relay.mx_port}, tls {tls}")
        if resolver is None:
            try:
                resolver = configured_resolver(config.dns)
            except ValueError as e:
                raise Failure(str(e)) from None
        for line in describe_mx(resolver, domain):
            print(f"  {line}")


def _addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    """A then AAAA of ``host``; NXDOMAIN or NODATA is no address, other trouble raises."""
    literal = address_literal(host)
    if literal is not None:
        return [literal]
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            addresses.extend(blocking_lookup(resolver, host, rdtype).values)
        except NXDomain:
            break
    return addresses


def describe_mx(resolver: dns.resolver.Resolver, domain: str) -> list[str]:
    """What MX routing to ``domain`` finds, one line each, MX in preference order.

    DNS trouble is a line too (the route is shown either way), never an exception.
    """
    literal = address_literal(domain)
    if literal is not None:
        return [f"address literal: {literal}"]
    name = domain.lower().rstrip(".")
    try:
        mx = blocking_lookup(resolver, name, "MX")
        if not mx.values:
            addresses = _addresses(resolver, name)
            if not addresses:
                return ["implicit MX: no A or AAAA records: mail to this domain fails"]
            return [f"implicit MX: {'AAAA' if ':' in a else 'A'} {a}" for a in addresses]
        if len(mx.values) == 1 and mx.values[0][1] in (".", ""):
            return ["null MX (RFC 7505): mail to this domain fails"]
        lines = []
        for preference, host in sorted(mx.values):
            try:
                found = ", ".join(_addresses(resolver, host)) or "no address"
            except DNSError as e:
                found = f"DNS lookup failed: {e.text}"
            lines.append(f"MX {preference} {host} ({found})")
        return lines
    except NXDomain:
        return [f"NXDOMAIN: {name} does not exist"]
    except DNSError as e:
        return [f"DNS lookup failed: {e.text}"]


def _load_queue(config: Config) -> list[Envelope]:
    directory = config.queue.directory
    if not directory.is_dir():
        return []
    spool = _offline_spool(config)
    envelopes = []
    for queue_id in spool.queue_ids():
        if not is_queue_id(queue_id):
            continue
        try:
            envelopes.append(spool.load(queue_id))
        except (OSError, ValueError, TypeError, KeyError):
            continue  # removed meanwhile, or being rewritten
    return envelopes


def _daemon_or_spool(config: Config, command: Any, offline: Callable[[], Any],
                     **arguments: Any) -> Any:
    """The running daemon's JSON answer to ``command``; ``offline()`` when none runs."""
    try:
        return json.loads(_control(config, command, **arguments)["json"])
    except NotRunning:
        return offline()


def cmd_queue_list(config: Config, args: argparse.Namespace) -> None:
    entries: list[dict[str, Any]] = _daemon_or_spool(
        config, ListQueue, lambda: queue_listing(_load_queue(config)))
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    now = time.time()
    if not entries:
        print("queue is empty")
        return
    for entry in entries:
        age = int(now - parse_rfc3339(entry["received"]))
        held = " HELD" if entry["held"] else ""
        print(f"{entry['id']}{held}  {entry['size']:>8}  {age:>6}s  <{entry['sender']}>")
        for rcpt in entry["recipients"]:
            nxt = rcpt["next_attempt"] or "now"
            print(f"    {rcpt['address']}  {rcpt['state']}  attempts={rcpt['attempts']}"
                  f"  next={nxt}"
                  + (f"  ({rcpt['last_error']})" if rcpt["last_error"] else ""))
    print(f"-- {len(entries)} messages")


def cmd_queue_show(config: Config, args: argparse.Namespace) -> None:
    queue_id = _queue_id(args.id)
    spool = _offline_spool(config)
    try:
        envelope = spool.load(queue_id)
        with spool.open_message(envelope) as message:
            head = message.read(256 * 1024)
    except FileNotFoundError:
        raise Failure(f"no such message in the queue: {queue_id}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise Failure(f"{spool.message_path(queue_id)}: unreadable entry: {e}") from None
    entry = _daemon_or_spool(config, ShowMessage, lambda: show_entry(envelope),
                             queue_id=queue_id)
    print(json.dumps(entry, indent=2))
    print()
    end = head.find(b"\r\n\r\n")
    print(head[: end if end >= 0 else len(head)].decode("utf-8", "replace")
          .replace("\r\n", "\n"))


class NotRunning(Failure):
    def __init__(self, path: object) -> None:
        super().__init__(f"relaygw is not running (no control socket at {path})")


def _control(config: Config, command: Any, **arguments: Any) -> dict[str, Any]:
    """One command to the running daemon; NotRunning when there is none."""
    path = socket_path(config.queue.directory)
    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        try:
            outcome["result"] = await call(reactor, path, command, **arguments)
        except ConnectError:
            outcome["error"] = NotRunning(path)
        except (UnknownMessage, MessageHeld, BadQueueId) as e:
            outcome["error"] = Failure(str(e))
        except CancelledError:
            outcome["error"] = Failure(f"no answer from relaygw on {path}")

    def main(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(run(reactor))

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise Failure(f"control socket {path}: failed (see above)") from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]  # type: ignore[no-any-return]


def _offline_spool(config: Config) -> Spool:
    def now(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return maybeDeferred(fn, *args)

    return Spool(config.queue.directory, now)


def _offline(config: Config, queue_id: str, change: Callable[[Spool, Envelope], object]) -> None:
    """hold/release/delete with no daemon: the spool files themselves."""
    spool = _offline_spool(config)
    try:
        envelope = spool.load(queue_id)
    except FileNotFoundError:
        raise Failure(f"no such message in the queue: {queue_id}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise Failure(f"{spool.message_path(queue_id)}: unreadable entry: {e}") from None
    errors: list[Any] = []
    d = change(spool, envelope)
    if isinstance(d, Deferred):
        d.addErrback(errors.append)
    if errors:
        errors[0].raiseException()


def _queue_id(text: str) -> str:
    if not is_queue_id(text):
        raise Failure(f"not a queue id: {text}")
    return text


def cmd_queue_flush(config: Config, args: argparse.Namespace) -> None:
    queue_id = None if args.id is None else _queue_id(args.id)
    arguments = {} if queue_id is None else {"queue_id": queue_id}
    count = _control(config, Flush, **arguments)["count"]
    print(f"flushed {count} message{'' if count == 1 else 's'}")


def _hold(spool: Spool, envelope: Envelope) -> object:
    envelope.held = True
    return spool.save(envelope)


def _release(spool: Spool, envelope: Envelope) -> object:
    envelope.held = False
    for recipient in envelope.pending:
        recipient.next_attempt = None
    return spool.save(envelope)


def _delete(spool: Spool, envelope: Envelope) -> object:
    return spool.remove(envelope.id)


def _change_on_daemon_or_spool(config: Config, args: argparse.Namespace, command: Any,
                     verb: str, offline: Callable[[Spool, Envelope], object],
                     what: str) -> dict[str, Any] | None:
    """Run a hold/release/delete on the daemon; with none running, on the spool files
    (nothing else uses them then). None when it was done offline."""
    queue_id = _queue_id(args.id)
    try:
        return _control(config, command, queue_id=queue_id)
    except NotRunning:
        _offline(config, queue_id, offline)
        print(f"{verb} {queue_id} (relaygw is not running: {what})")
        return None


def cmd_queue_hold(config: Config, args: argparse.Namespace) -> None:
    if _change_on_daemon_or_spool(config, args, Hold, "held", _hold,
                                  "spool file rewritten") is not None:
        print(f"held {args.id}")


def cmd_queue_release(config: Config, args: argparse.Namespace) -> None:
    if _change_on_daemon_or_spool(config, args, Release, "released", _release,
                        "spool file rewritten") is not None:
        print(f"released {args.id}")


def cmd_queue_delete(config: Config, args: argparse.Namespace) -> None:
    answer = _change_on_daemon_or_spool(config, args, Delete, "deleted", _delete,
                                        "spool files removed")
    if answer is not None:
        print(f"deleted {args.id}" + (" (its files go when the delivery in flight ends)"
                                      if answer["in_flight"] else ""))


def cmd_passwd(config: Config, args: argparse.Namespace) -> None:
    """Set USER's password from the first line of stdin (so it never shows in ps)."""
    if config.auth is None:
        raise Failure(f"{config.source}: no [auth] section: there is no users_file to write")
    problem = check_username(args.user)
    if problem is not None:
        raise Failure(f"{problem}: {args.user!r}")
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise Failure("empty password refused (give it on the first line of stdin)")
    try:
        set_password(config.auth.users_file, args.user, hash_password(password))
    except UsersFileError as e:
        raise Failure(str(e)) from None
    print(f"password set for {args.user} in {config.auth.users_file}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML configuration (default: the embedded one)")
    parser = argparse.ArgumentParser(prog="relaygwctl", parents=[common],
                                     description="Operate a relaygw gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", parents=[common],
                                help="validate the config and print what it means")
    check.set_defaults(run=cmd_check)
    route = commands.add_parser("route", parents=[common],
                                help="show the route, action and next hop of an address")
    route.add_argument("address")
    route.set_defaults(run=cmd_route)
    queue = commands.add_parser("queue", parents=[common], help="inspect and operate the queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True,
                                          metavar="QUEUE_COMMAND")
    listing = queue_commands.add_parser("list", parents=[common], help="list queued messages")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(run=cmd_queue_list)
    show = queue_commands.add_parser("show", parents=[common],
                                     help="envelope, state and headers of one message")
    show.add_argument("id")
    show.set_defaults(run=cmd_queue_show)
    flush = queue_commands.add_parser("flush", parents=[common],
                                      help="retry now (every message, or ID), on the daemon")
    flush.add_argument("id", nargs="?", metavar="ID")
    flush.set_defaults(run=cmd_queue_flush)
    for name, run, what in (("hold", cmd_queue_hold, "start no more delivery attempts for ID"),
                            ("release", cmd_queue_release, "undo hold: ID is due now"),
                            ("delete", cmd_queue_delete, "remove ID from the queue, no bounce")):
        sub = queue_commands.add_parser(name, parents=[common], help=what)
        sub.add_argument("id", metavar="ID")
        sub.set_defaults(run=run)
    passwd = commands.add_parser("passwd", parents=[common],
                                 help="set USER's password (read from stdin) in users_file")
    passwd.add_argument("user", metavar="USER")
    passwd.set_defaults(run=cmd_passwd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None))
        args.run(config, args)
    except (ConfigError, Failure) as e:
        print(f"relaygwctl: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"relaygwctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
