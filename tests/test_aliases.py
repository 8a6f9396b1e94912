"""Alias expansion (address and whole-domain aliases, recursion, copies, dedup) and loops."""

from __future__ import annotations

import pytest

from relaygw.addresses import parse_mailbox
from relaygw.aliases import MAX_DEPTH, AliasLoop, expand, find_alias_loop

ALIASES: dict[str, tuple[str, ...]] = {
    "postmaster@example.test": ("alice@example.test",),
    "sales@example.test": ("bob@branch.example.test", "carol@partner.test"),
    "@old.example.test": ("{local}@example.test",),
    "boss@old.example.test": ("ceo@example.test",),           # exact beats the domain alias
    "team@example.test": ("sales@example.test", "postmaster@example.test"),  # recursion
    "all@example.test": ("team@example.test", "alice@example.test", "carol@partner.test"),
    "keep@example.test": ("keep@example.test", "archive@example.test"),  # a copy stays
    "@moved.test": ("{local}.{domain}@example.test",),
    "@quoted.test": ("{local}@example.test",),
    "chain1@example.test": ("chain2@example.test",),
    "chain2@example.test": ("chain3@example.test",),
    "chain3@example.test": ("end@far.test",),
}


def addresses(text: str, aliases: dict[str, tuple[str, ...]] = ALIASES) -> list[str] | None:
    result = expand(aliases, parse_mailbox(text))
    return None if result is None else [str(m) for m in result]


@pytest.mark.parametrize(("address", "expected"), [
    ("nobody@example.test", None),
    ("alice@example.test", None),
    ("postmaster@example.test", ["alice@example.test"]),
    ("PostMaster@Example.TEST", ["alice@example.test"]),  # keys match case-insensitively
    ("sales@example.test", ["bob@branch.example.test", "carol@partner.test"]),
    ("anyone@old.example.test", ["anyone@example.test"]),
    ("Mixed.Case@old.example.test", ["Mixed.Case@example.test"]),  # {local} as given
    ("boss@old.example.test", ["ceo@example.test"]),
    ("team@example.test",
     ["bob@branch.example.test", "carol@partner.test", "alice@example.test"]),
    # dedup: alice and carol are reached twice, delivered once, in first-seen order
    ("all@example.test",
     ["bob@branch.example.test", "carol@partner.test", "alice@example.test"]),
    ("keep@example.test", ["keep@example.test", "archive@example.test"]),
    ("x@moved.test", ["x.moved.test@example.test"]),
    ('"a b"@quoted.test', ['"a b"@example.test']),
    ("chain1@example.test", ["end@far.test"]),
    ("user@sub.old.example.test", None),  # a domain alias is for that domain only
], ids=repr)
def test_expand(address: str, expected: list[str] | None) -> None:
    assert addresses(address) == expected


def test_expand_without_aliases() -> None:
    assert expand({}, parse_mailbox("a@example.test")) is None


def test_domain_alias_self_copy_keeps_the_address() -> None:
    aliases = {"@example.test": ("{local}@example.test", "{local}@backup.test")}
    assert addresses("u@example.test", aliases) == ["u@example.test", "u@backup.test"]


def test_expand_survives_a_loop_that_slipped_by() -> None:
    # find_alias_loop refuses this at start-up; expansion must still terminate.
    aliases = {"a@x.test": ("b@x.test",), "b@x.test": ("a@x.test", "c@y.test")}
    assert addresses("a@x.test", aliases) == ["a@x.test", "c@y.test"]


def test_expand_stops_at_max_depth() -> None:
    aliases = {f"n{i}@x.test": (f"n{i + 1}@x.test",) for i in range(MAX_DEPTH + 5)}
    result = addresses("n0@x.test", aliases)
    assert result is not None and len(result) == 1
    assert result[0].startswith("n") and result[0] != f"n{MAX_DEPTH + 5}@x.test"


def test_find_alias_loop_accepts_the_example() -> None:
    find_alias_loop(ALIASES)  # no loop: self-copies are not loops


@pytest.mark.parametrize(("aliases", "key"), [
    ({"a@x.test": ("b@x.test",), "b@x.test": ("a@x.test",)}, "a@x.test"),
    ({"a@x.test": ("b@x.test",), "b@x.test": ("c@x.test",), "c@x.test": ("A@x.test",)},
     "a@x.test"),
    ({"a@x.test": ("ok@y.test", "b@x.test"), "b@x.test": ("a@x.test",)}, "a@x.test"),
    ({"@a.test": ("{local}@b.test",), "@b.test": ("{local}@a.test",)}, "@a.test"),
    ({"@a.test": ("{local}@b.test",), "@b.test": ("postmaster@a.test",)}, "@a.test"),
    ({"x@b.test": ("x@a.test",), "@a.test": ("{local}@b.test",)}, "x@b.test"),
], ids=["a-b-a", "a-b-c-a", "second-target", "domains", "domain-to-address",
        "address-via-domain"])
def test_find_alias_loop(aliases: dict[str, tuple[str, ...]], key: str) -> None:
    with pytest.raises(AliasLoop) as caught:
        find_alias_loop(aliases)
    assert caught.value.key == key
    assert " -> " in str(caught.value)


def test_find_alias_loop_names_the_chain() -> None:
    with pytest.raises(AliasLoop, match=r"^a@x\.test -> b@x\.test -> a@x\.test$"):
        find_alias_loop({"a@x.test": ("b@x.test",), "b@x.test": ("a@x.test",)})


def test_find_alias_loop_refuses_a_chain_deeper_than_max_depth() -> None:
    aliases = {f"n{i}@x.test": (f"n{i + 1}@x.test",) for i in range(MAX_DEPTH + 5)}
    with pytest.raises(AliasLoop):
        find_alias_loop(aliases)
