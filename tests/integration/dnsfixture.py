"""A DNS server for the tests: twisted.names in a child process, answers from a dict.

    dns = DNSServer(tmp_path).start({"example.net": {"MX": [[10, "mx1.example.net"]]},
                                     "mx1.example.net": {"A": ["127.0.0.2"]}})
    config["dns"] = {"nameservers": [dns.nameserver], "timeout": "2s"}
    dns.update(...)          # new answers, effective for the next query

Names absent from the dict are NXDOMAIN; ``{"MX": [[0, "."]]}`` is a null MX (RFC 7505);
names in ``timeout`` are never answered, names in ``servfail`` get SERVFAIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .harness import wait_for

CHILD = Path(__file__).with_name("_dns_child.py")


class DNSServer:
    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.zone_path = directory / "zone.json"
        self.out_path = directory / "dns.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def nameserver(self) -> str:
        """The ``host:port`` string for ``[dns] nameservers``."""
        return f"{self.host}:{self.port}"

    def update(self, records: Mapping[str, Any], *, timeout: Iterable[str] = (),
               servfail: Iterable[str] = ()) -> None:
        zone = {
            "records": {name.lower().rstrip("."): value for name, value in records.items()},
            "timeout": [n.lower().rstrip(".") for n in timeout],
            "servfail": [n.lower().rstrip(".") for n in servfail],
        }
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        os.replace(tmp, self.zone_path)  # atomic: the child never reads half a file

    def start(self, records: Mapping[str, Any] | None = None, **kwargs: Any) -> DNSServer:
        self.update(records or {}, **kwargs)
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(self.zone_path), self.host],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

        def ready() -> int | None:
            assert self.proc is not None
            text = self.out_path.read_text(errors="replace")
            match = re.search(r"^PORT (\d+)$", text, re.M)
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"DNS child exited {self.proc.returncode}: {text}")
            return None

        self.port = wait_for(ready, 20.0, "DNS server ready")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        self.proc = None
