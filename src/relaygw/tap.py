"""``twistd relaygw``: command-line options and makeService."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from relaygw.config import Config, ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the relaygw SMTP relay. Without --config it uses the embedded default:"
                " an smtp listener on 127.0.0.1:2525, local delivery for 'localhost' into"
                " ./var/mail, relay by MX for clients in 127.0.0.0/8 and ::1.")
    optParameters = [["config", "c", None, "TOML configuration file"]]

    loaded: Config

    def postOptions(self) -> None:
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as e:
            # One line and a non-zero exit, before anything listens.
            raise SystemExit(f"relaygw: configuration error: {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from relaygw.service import build_service

    return build_service(options.loaded, reactor)
