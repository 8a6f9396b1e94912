"""``relaygwctl passwd USER``: the password from stdin into ``[auth] users_file``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relaygw import auth
from relaygw.cli import main
from support import config_text


def write_config(tmp_path: Path, *, with_auth: bool = True) -> Path:
    text = config_text(tmp_path / "spool")
    if with_auth:
        text += f'\n[auth]\nusers_file = "{tmp_path / "users"}"\n'
    path = tmp_path / "relaygw.toml"
    path.write_text(text)
    return path


def run(monkeypatch: pytest.MonkeyPatch, stdin: str, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(list(argv))


def test_sets_a_password_and_keeps_other_users(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert run(monkeypatch, "first secret\nignored\n", "--config", str(config),
               "passwd", "alice") == 0
    assert run(monkeypatch, "bob's\n", "passwd", "bob", "--config", str(config)) == 0
    assert run(monkeypatch, "second secret\r\n", "passwd", "alice",
               "--config", str(config)) == 0
    users_file = tmp_path / "users"
    users = auth.load_users(users_file)
    assert set(users) == {"alice", "bob"}
    assert auth.verify_password("second secret", users["alice"])
    assert auth.verify_password("bob's", users["bob"])
    assert users_file.stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr()
    assert "second secret" not in out.out + out.err


def test_empty_password_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    for stdin in ("", "\n"):
        assert run(monkeypatch, stdin, "--config", str(config), "passwd", "alice") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("empty password" in line for line in err)
    assert not (tmp_path / "users").exists()


def test_without_auth_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, with_auth=False)
    assert run(monkeypatch, "pw\n", "--config", str(config), "passwd", "alice") == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "[auth]" in line


def test_bad_user_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    assert run(monkeypatch, "pw\n", "--config", str(config), "passwd", "a:b") == 1


def test_missing_user_is_bad_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run(monkeypatch, "pw\n", "--config", str(config), "passwd")
    assert exit_.value.code == 2
