"""RFC 5321 address syntax: reverse/forward paths and their ESMTP parameters.

Pure functions, no I/O. We accept what RFC 5321 section 4.1.2 allows (dot-atom
or quoted local parts, domain names or address literals, an ignored source
route) and nothing the relay probes hide in between: ``user@other@local`` is a
syntax error, ``"user@other"@local`` is a local part, ``@local:user@other`` is
``user@other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LITERAL = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9]{1,3}(?:\.[0-9]{1,3}){3})\]")
_SOURCE_ROUTE = re.compile(rf"@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")


class AddressError(ValueError):
    """An address that RFC 5321 does not allow."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """``local@domain``; the domain is kept lowercased, the local part as sent."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def unquoted_local(self) -> str:
        """The local part with RFC 5321 quoting removed (for mailbox names)."""
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local


def parse_mailbox(text: str) -> Mailbox:
    """Parse ``local@domain`` (no angle brackets)."""
    if not text.isascii():
        raise AddressError("non-ASCII address (SMTPUTF8 is not offered)")
    match = _DOT_ATOM.match(text) or _QUOTED.match(text)
    if not match:
        raise AddressError("bad local part")
    local = match.group(0)
    rest = text[match.end():]
    if not rest.startswith("@"):
        raise AddressError("missing @domain")
    domain = rest[1:]
    if not (_DOMAIN.fullmatch(domain) or _LITERAL.fullmatch(domain)):
        raise AddressError("bad domain")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if len(domain) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    return Mailbox(local, domain.rstrip(".").lower())


def split_path_and_params(argument: str) -> tuple[str, str]:
    """Split ``<path> PARAMS`` into the bracketed path and the parameter text.

    One space after the colon is tolerated (``MAIL FROM: <a@b>``), as most MTAs do.
    """
    argument = argument.lstrip(" ")
    if not argument.startswith("<"):
        raise AddressError("the address must be in angle brackets")
    index = _closing_bracket(argument)
    if index < 0:
        raise AddressError("missing closing angle bracket")
    path, params = argument[: index + 1], argument[index + 1:]
    if params and not params.startswith(" "):
        raise AddressError("junk after the address")
    return path, params.strip(" ")


def _closing_bracket(argument: str) -> int:
    """Index of the ``>`` that closes the path, or -1.

    A quoted local part may contain '>': the closing bracket is the first one
    outside quotes (without a quote, simply the first one)."""
    if '"' not in argument:
        return argument.find(">")
    in_quote = escaped = False
    for index, char in enumerate(argument):
        if escaped:
            escaped = False
        elif char == "\\" and in_quote:
            escaped = True
        elif char == '"':
            in_quote = not in_quote
        elif char == ">" and not in_quote:
            return index
    return -1


def parse_path(path: str, *, allow_null: bool) -> Mailbox | None:
    """Parse ``<...>``: None for the null path ``<>`` where allowed."""
    inner = path[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("the null address is not allowed here")
    if len(path) > MAX_PATH:
        raise AddressError("path longer than 256 octets")
    route = _SOURCE_ROUTE.match(inner)
    if route:  # RFC 5321 4.1.2: accept, then ignore the source route
        inner = inner[route.end():]
    return parse_mailbox(inner)


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY[=VALUE]`` separated by spaces; keys uppercased."""
    params: dict[str, str | None] = {}
    for item in text.split():
        match = _PARAM.fullmatch(item)
        if not match:
            raise AddressError(f"bad parameter {item!r}")
        params[match.group(1).upper()] = match.group(2)
    return params
