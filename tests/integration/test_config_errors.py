"""A broken config stops start-up: one line naming the file and the key, non-zero, no socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from .harness import (
    Daemon,
    DaemonFactory,
    base_config,
    listening_ports_of,
    pick_port,
    port_listened,
    to_toml,
)

pytestmark = pytest.mark.integration

EXIT_TIMEOUT = 20.0


def _config(port: int) -> dict[str, Any]:
    config = base_config()
    config["listener"] = [{"endpoint": f"tcp:{port}:interface=127.0.0.1", "kind": "smtp"}]
    return config


def _with(section: str, **values: object) -> Callable[[int], str]:
    def make(port: int) -> str:
        config = _config(port)
        config.setdefault(section, {}).update(values)
        return to_toml(config)

    return make


def _edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[int], str]:
    def make(port: int) -> str:
        config = _config(port)
        edit(config)
        return to_toml(config)

    return make


def _set_listener(**values: str) -> Callable[[dict[str, Any]], None]:
    return lambda config: config["listener"][0].update(values)


def _route_without_domains(config: dict[str, Any]) -> None:
    config["route"].insert(0, {"action": "local"})


def _bad_action(config: dict[str, Any]) -> None:
    config["route"][0]["action"] = "deliver"


# (id, config maker taking the listener port, text the line must name; "a|b": either)
CASES: list[tuple[str, Callable[[int], str], list[str]]] = [
    ("unknown-key", _with("limits", max_mesage_size=1000), ["max_mesage_size"]),
    ("unknown-section-key", _with("server", hostnme="x.test"), ["hostnme"]),
    ("wrong-type", _with("limits", max_recipients="many"), ["max_recipients"]),
    ("wrong-type-bool", _with("limits", max_connections=True), ["max_connections"]),
    ("impossible-value", _with("limits", max_message_size=-1), ["max_message_size"]),
    ("bad-duration", _with("limits", command_timeout="soon"), ["command_timeout"]),
    ("bad-duration-list", _with("queue", retry_schedule=["1m", "5 parsecs"]),
     ["retry_schedule"]),
    ("bad-endpoint", _edit(_set_listener(endpoint="nonsense:1234")), ["endpoint"]),
    ("bad-kind", _edit(_set_listener(kind="lmtp")), ["kind"]),
    ("bad-cidr", _with("relay", trusted_networks=["10.0.0.0/33"]), ["trusted_networks"]),
    ("route-without-domains", _edit(_route_without_domains), ["domains"]),
    ("bad-route-action", _edit(_bad_action), ["action"]),
    ("alias-loop", _with("aliases", **{"loop1@example.test": ["loop2@example.test"],
                                       "loop2@example.test": ["loop1@example.test"]}),
     ["loop1@example.test|loop2@example.test"]),
    ("toml-syntax", lambda port: "[server\nhostname = 1\n", []),
    # files start-up reads: read before twistd logs or listens
    ("tls-certificate-missing", _with("tls", certificate="missing.pem",
                                      private_key="missing.key"), ["certificate"]),
    ("users-file-unreadable", _with("auth", users_file="/", require_tls=False),
     ["users_file"]),
]


@dataclass
class Outcome:
    daemon: Daemon
    returncode: int | None
    listened: bool
    lines: list[str]


def _output_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.output().splitlines()
            if line.strip() and not line.startswith("===== relaygw harness")]


@pytest.fixture(scope="module")
def outcomes(module_daemons: DaemonFactory) -> dict[str, Outcome]:
    """Start every broken config at once (start-up costs ~1.5 s of CPU each), then watch."""
    runs: dict[str, Daemon] = {}
    for case_id, make, _ in CASES:
        port = pick_port()
        runs[case_id] = module_daemons.prepare(make(port), port=port)
    missing = module_daemons.prepare(None)
    missing.extra_args = ["--config", str(missing.run_dir / "nonexistent.toml")]
    runs["missing-file"] = missing
    procs = {case_id: daemon.spawn() for case_id, daemon in runs.items()}
    listened = dict.fromkeys(runs, False)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        for case_id, daemon in runs.items():
            pid = procs[case_id].pid
            listened[case_id] = (listened[case_id] or port_listened(daemon.port)
                                 or bool(procs[case_id].poll() is None
                                         and listening_ports_of(pid)))
        time.sleep(0.05)  # polling interval against the deadline above
    result = {}
    for case_id, daemon in runs.items():
        code = procs[case_id].poll()
        daemon.stop()  # kills any that did not exit
        result[case_id] = Outcome(daemon, code, listened[case_id] or port_listened(daemon.port),
                                  _output_lines(daemon))
    return result


@pytest.mark.parametrize(("case_id", "names"), [(c[0], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_broken_config_refuses_to_start(
    outcomes: dict[str, Outcome], case_id: str, names: list[str]
) -> None:
    outcome = outcomes[case_id]
    output = outcome.daemon.output()
    config_path = outcome.daemon.config_path
    assert config_path is not None
    assert outcome.returncode is not None, f"still running after {EXIT_TIMEOUT}s:\n{output}"
    assert outcome.returncode != 0, output
    assert not outcome.listened, "listened although the config is broken"
    assert len(outcome.lines) == 1, f"expected one line, got {len(outcome.lines)}:\n{output}"
    (line,) = outcome.lines
    assert str(config_path) in line, f"the file is not named: {line!r}"
    for name in names:
        assert any(alternative in line for alternative in name.split("|")), \
            f"{name!r} not named in {line!r}"


def test_missing_config_file_refuses_to_start(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["missing-file"]
    output = outcome.daemon.output()
    assert outcome.returncode not in (None, 0), output
    assert len(outcome.lines) == 1 and "nonexistent.toml" in outcome.lines[0], output


def test_a_port_in_use_stops_start_up_with_one_line(daemons: DaemonFactory) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        daemon = daemons.prepare(to_toml(_config(port)), port=port)
        proc = daemon.spawn()
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT)
        finally:
            daemon.stop()
    lines = [line for line in _output_lines(daemon)
             if "relaygw: cannot listen" in line or "Traceback" in line]
    assert code not in (None, 0)
    assert len(lines) == 1 and f"tcp:{port}:interface=127.0.0.1" in lines[0], \
        daemon.output()
    assert str(daemon.config_path) in lines[0]
