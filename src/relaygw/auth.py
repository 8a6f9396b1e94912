"""SMTP AUTH credentials: the users file, scrypt hashes, SASL PLAIN decoding.

The users file holds one ``user:hash`` a line (``#`` comments and blank lines
allowed); the hash is self-describing, ``scrypt$N$r$p$salt$hash`` with base64
salt and hash, so the cost can be raised later without breaking old entries.
Everything here is pure except ``Authenticator.check``, which hands the
CPU-heavy scrypt to the gateway's thread pool: a login must never stall the
reactor for the other sessions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

SCHEME = "scrypt"
SCRYPT_N = 2 ** 14           # ~16 MiB and ~50 ms a check: cheap for us, dear for a guesser
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_SCRYPT_N = 2 ** 20       # a hash from the file may not ask for more (1 GiB with r=8)
MAX_USERNAME = 255

BlockingRunner = Callable[..., Deferred[Any]]


class UsersFileError(Exception):
    """A malformed users file, phrased as one line naming the file and the line."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * r * (n + p + 2) + 1024 * 1024)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """The stored form of ``password``, with a fresh random salt unless one is given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password.encode("utf-8"), salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(N, r, p, salt, hash) of a stored hash; ValueError if it is not one we can check."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("not a scrypt$N$r$p$salt$hash value")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("bad number or base64 in the hash") from None
    if n < 2 or n & (n - 1) or n > MAX_SCRYPT_N or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ValueError("scrypt parameters out of range")
    if not salt or not 16 <= len(digest) <= 64:
        raise ValueError("empty salt or bad hash length")
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; constant time in the comparison."""
    try:
        n, r, p, salt, digest = parse_hash(stored)
    except ValueError:
        return False
    candidate = _scrypt(password.encode("utf-8"), salt, n, r, p, len(digest))
    return hmac.compare_digest(candidate, digest)


@functools.cache
def dummy_hash() -> str:
    """Checked for unknown users, so that "no such user" costs as long as "wrong
    password" and the timing does not tell which names exist."""
    return hash_password("relaygw-no-such-user", salt=b"\0" * SALT_BYTES)


def check_username(user: str) -> str | None:
    """Why ``user`` cannot be a users-file name, or None if it can."""
    if not user:
        return "empty user name"
    if len(user) > MAX_USERNAME:
        return "user name too long"
    if ":" in user or any(c.isspace() or not c.isprintable() for c in user):
        return "user name with ':', white space or a control character"
    return None


def parse_users(text: str, source: str = "<users>") -> dict[str, str]:
    """``user -> stored hash``; UsersFileError on a malformed line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.rpartition(":")
        if not sep or check_username(user) is not None:
            raise UsersFileError(f"{source}: line {number}: expected user:hash")
        try:
            parse_hash(stored)
        except ValueError as e:
            raise UsersFileError(f"{source}: line {number}: user {user}: {e}") from None
        users[user] = stored
    return users


def load_users(path: Path) -> dict[str, str]:
    """Read the users file; a missing file is no users (``relaygwctl passwd`` creates it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UsersFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{path}: not UTF-8 text") from None
    return parse_users(text, str(path))


def set_password(path: Path, user: str, stored: str) -> None:
    """Add or replace ``user`` in the users file, atomically and durably (mode 0600).

    Other lines, comments included, are kept as they are. A crash leaves the
    old file or the new one, never a mix: temp file, fsync, rename, directory fsync.
    """
    problem = check_username(user)
    if problem is not None:
        raise UsersFileError(f"{problem}: {user!r}")
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    parse_users(old, str(path))  # refuse to rewrite a file we cannot read back
    lines, replaced = [], False
    for raw in old.splitlines():
        name, sep, _ = raw.strip().rpartition(":")
        if sep and not raw.strip().startswith("#") and name == user:
            if not replaced:
                lines.append(f"{user}:{stored}")
            replaced = True
        else:
            lines.append(raw)
    if not replaced:
        lines.append(f"{user}:{stored}")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- SASL ----------------------------------------------------------------------------------


def decode_base64(text: str) -> bytes:
    """A client's SASL response; ValueError if it is not strict base64 (``=`` is empty)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("bad base64") from None


def parse_plain(response: bytes) -> tuple[str, str] | None:
    """(user, password) of a SASL PLAIN response (RFC 4616), or None if malformed.

    An authorization identity other than the user itself is refused: we do not
    let one user act as another.
    """
    parts = response.split(b"\0")
    if len(parts) != 3:
        return None
    try:
        authzid, user, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    if not user or (authzid and authzid != user):
        return None
    return user, password


class Authenticator:
    """The users of ``[auth] users_file``, checked off the reactor thread."""

    log = Logger()

    def __init__(self, path: Path, run_blocking: BlockingRunner) -> None:
        self.path = path
        self.run_blocking = run_blocking
        self.users: dict[str, str] = {}

    def load(self) -> None:
        """Read the file now (start-up and reload); UsersFileError leaves the old users."""
        self.users = load_users(self.path)
        self.log.info("auth: {count} users from {path}", count=len(self.users),
                      path=str(self.path))

    def check(self, user: str, password: str) -> Deferred[bool]:
        """Fires with True when the password is right; scrypt runs in the thread pool."""
        stored = self.users.get(user)
        if stored is None:
            d = self.run_blocking(verify_password, password, dummy_hash())
            return d.addCallback(lambda _: False)
        return self.run_blocking(verify_password, password, stored)
