"""Alias expansion: address and whole-domain aliases, recursive and loop-safe.

Keys are ``local@domain`` or ``@domain`` (lowercase); an exact address alias wins
over its domain's alias. Targets may use ``{local}`` and ``{domain}`` of the
address being expanded. A target equal to the alias itself means "keep a copy
here too" (as in Postfix's virtual(5)); any longer cycle is a configuration
error found at start-up by ``find_alias_loop``.
"""

from __future__ import annotations

from collections.abc import Mapping

from relaygw.addresses import Mailbox, parse_mailbox

MAX_DEPTH = 20
_PROBE_LOCAL = "alias-loop-probe"


class AliasLoop(ValueError):
    def __init__(self, key: str, chain: list[str]) -> None:
        super().__init__(" -> ".join(chain))
        self.key = key


def _targets(aliases: Mapping[str, tuple[str, ...]], address: Mailbox) -> tuple[str, ...] | None:
    key = f"{address.local.lower()}@{address.domain}"
    templates = aliases.get(key)
    if templates is None:
        templates = aliases.get(f"@{address.domain}")
    if templates is None:
        return None
    return tuple(t.replace("{local}", address.local).replace("{domain}", address.domain)
                 for t in templates)


def _key(address: Mailbox) -> str:
    return f"{address.local.lower()}@{address.domain}"


def expand(aliases: Mapping[str, tuple[str, ...]], address: Mailbox) -> list[Mailbox] | None:
    """The final addresses ``address`` stands for, or None when no alias applies."""
    if not aliases or _targets(aliases, address) is None:
        return None
    results: list[Mailbox] = []
    seen: set[str] = set()

    def walk(current: Mailbox, chain: frozenset[str]) -> None:
        targets = _targets(aliases, current) if len(chain) < MAX_DEPTH else None
        if targets is None:
            if _key(current) not in seen:
                seen.add(_key(current))
                results.append(current)
            return
        for text in targets:
            target = parse_mailbox(text)
            if _key(target) == _key(current) or _key(target) in chain:
                if _key(target) not in seen:  # self copy (or a loop that slipped by)
                    seen.add(_key(target))
                    results.append(target)
                continue
            walk(target, chain | {_key(current)})

    walk(address, frozenset())
    return results


def find_alias_loop(aliases: Mapping[str, tuple[str, ...]]) -> None:
    """Raise AliasLoop naming the first alias whose expansion comes back to itself."""
    for key in aliases:
        start = f"{_PROBE_LOCAL}{key}" if key.startswith("@") else key

        def walk(address: str, chain: list[str], root: str = key) -> None:
            if len(chain) > MAX_DEPTH:
                raise AliasLoop(root, [*chain, address])
            targets = _targets(aliases, parse_mailbox(address))
            if targets is None:
                return
            for target in targets:
                target = target.lower()
                if target == address:
                    continue
                if target in chain:
                    raise AliasLoop(root, [*chain, address, target])
                walk(target, [*chain, address])

        walk(start, [])
