"""The files start-up reads besides the config, read ahead of it.

twistd reads the certificate, its key and the users file only once it has
started logging and entered its --rundir; an unusable one would then stop it
after log lines and, before the gateway's check ran first, after its
listeners were bound. ``check_files`` reads them where ``twistd relaygw``
parses its options and where ``relaygwctl check`` validates, so that a
missing or broken file is one line and a non-zero exit before anything
starts, as a broken config is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from relaygw.auth import UsersFileError, load_users
from relaygw.config import Config, ConfigError
from relaygw.tlsserver import TLSLoadError, load_options


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line an operator reads.

    An Exception, not SystemExit: a daemonized twistd reports only an
    Exception to its waiting parent (which then prints it and exits 1);
    with SystemExit the parent waits forever. ``relaygw.service.Services``
    turns it into SystemExit under ``twistd -n``, where a traceback would
    be printed."""


def check_files(config: Config, rundir: str | Path = ".") -> None:
    """Read the [tls] certificate and key and the [auth] users file as start-up
    will (relative paths against ``rundir``, where twistd reads them); raise
    ConfigError naming the config file and the key if one is unusable."""
    base = Path(rundir)
    try:
        if config.tls is not None:
            load_options(replace(config.tls, certificate=base / config.tls.certificate,
                                 private_key=base / config.tls.private_key))
    except TLSLoadError as e:  # it names the key: "[tls] certificate: PATH: ..."
        raise ConfigError(f"{config.source}: {e}") from None
    try:
        if config.auth is not None:
            load_users(base / config.auth.users_file)
    except UsersFileError as e:
        raise ConfigError(f"{config.source}: [auth] users_file: {e}") from None
