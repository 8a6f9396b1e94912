"""relaygwctl check: validates the config and prints what it means; exit codes 0/1/2."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygw.cli import main

CONFIG = """
[server]
hostname = "relay.example.test"
[[listener]]
endpoint = "tcp:2525:interface=127.0.0.1"
[[route]]
domains = ["example.test"]
action = "local"
mailboxes = ["alice"]
[[route]]
domains = ["branch.example.test"]
action = "relay"
via = "hub.example.test:2525"
tls = "required"
[[route]]
domains = ["*"]
action = "relay"
[aliases]
"sales@example.test" = ["alice@example.test"]
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_check_prints_the_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           where: str) -> None:
    path = tmp_path / "relaygw.toml"
    path.write_text(CONFIG)
    args = (["--config", str(path), "check"] if where == "before"
            else ["check", "--config", str(path)])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"config: {path}: ok" in out
    assert "hostname: relay.example.test" in out
    assert "listener: tcp:2525:interface=127.0.0.1 (smtp)" in out
    routes = [line for line in out.splitlines() if line.startswith("route ")]
    assert [r.split(":")[0] for r in routes] == ["route 1", "route 2", "route 3"]  # in order
    assert "example.test -> local" in routes[0] and "mailboxes=alice" in routes[0]
    assert "via=hub.example.test:2525 tls=required" in routes[1]
    assert "* -> relay (accept_from=trusted)" in routes[2]
    assert "alias: sales@example.test -> alice@example.test" in out


def test_check_refuses_a_bad_config_in_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace('action = "local"', 'action = "deliver"'))
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and "route[0].action" in err


def test_check_refuses_a_nameserver_that_is_not_an_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Caught here, not as a traceback when twistd starts."""
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace("[[listener]]", '[dns]\nnameservers = ["localhost"]\n'
                                   "[[listener]]", 1))
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"relaygwctl: {path}: dns.nameservers: must be an IP address, "
                                "optionally with :port, not 'localhost'"]


def test_check_without_config_is_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "config: <default>: ok" in out
    assert "listener: tcp:2525:interface=127.0.0.1 (smtp)" in out


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["no-such-command"])
    assert caught.value.code == 2


@pytest.mark.parametrize(("section", "named"), [
    ('[tls]\ncertificate = "missing.pem"\nprivate_key = "missing.key"\n',
     "[tls] certificate: missing.pem"),
    ('[auth]\nusers_file = "."\nrequire_tls = false\n', "[auth] users_file: "),
], ids=["certificate missing", "users file a directory"])
def test_check_reads_the_files_start_up_will_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        section: str, named: str) -> None:
    """Relative to where it runs, as twistd reads them in its --rundir."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "relaygw.toml"
    path.write_text(CONFIG.replace("[[listener]]", section + "[[listener]]", 1))
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and named in err
