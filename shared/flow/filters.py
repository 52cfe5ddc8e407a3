"""The words of `show security flow session ...` and `clear security flow session ...`.

The CLI parses them to refuse a typo before anything is sent; the flow service parses the
same words again from the bus (they are untrusted there) with this same code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from ikefarm.shared.flow.settings import protocol_number
from ikefarm.shared.flow.table import SessionFilter

MAX_WORDS = 32
MAX_WORD_CHARS = 128

# word -> SessionFilter field; None: a word without a value
_VALUED = {
    "session-identifier": "session_id",
    "source-prefix": "source_prefix",
    "destination-prefix": "destination_prefix",
    "protocol": "protocol",
    "destination-port": "destination_port",
    "application": "application",
    "interface": "interface",
}
SHOW_WORDS = (*_VALUED, "tunnel", "summary")
CLEAR_WORDS = (*_VALUED, "all", "resource-manager")
USAGE = {
    "show": "show security flow session [summary] [session-identifier N | source-prefix P | "
    "destination-prefix P | protocol NAME|N | destination-port N | application NAME | "
    "interface NAME | tunnel]...",
    "clear": "clear security flow session all | session-identifier N | application NAME | "
    "destination-port N | interface NAME | protocol NAME|N | source-prefix P | "
    "destination-prefix P | resource-manager",
}


class FilterError(ValueError):
    """Words that do not name sessions; the text says which and why."""


def _value(word: str, raw: str) -> Any:
    if word == "session-identifier":
        if not raw.isdigit() or len(raw) > 19:
            raise FilterError(f"session-identifier wants a number, got {raw!r}")
        return int(raw)
    if word == "destination-port":
        if not raw.isdigit() or int(raw) > 65535:
            raise FilterError(f"destination-port wants 0-65535, got {raw!r}")
        return int(raw)
    if word == "protocol":
        try:
            return protocol_number(raw)
        except ValueError as exc:
            raise FilterError(str(exc)) from None
    if word in ("source-prefix", "destination-prefix"):
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise FilterError(f"{word} wants an address or prefix, got {raw!r}") from None
    if not raw.isprintable() or not raw:
        raise FilterError(f"{word} wants a printable name")
    return raw


def parse_words(verb: str, words: list[str]) -> tuple[SessionFilter, bool]:
    """(filter, summary) for `show`, (filter, False) for `clear`; FilterError otherwise."""
    if verb not in USAGE:
        raise FilterError(f"unknown verb {verb!r}")
    if not isinstance(words, list) or len(words) > MAX_WORDS:
        raise FilterError(f"at most {MAX_WORDS} words")
    for word in words:
        if not isinstance(word, str) or len(word) > MAX_WORD_CHARS:
            raise FilterError(f"each word is a string of at most {MAX_WORD_CHARS} characters")
    allowed = SHOW_WORDS if verb == "show" else CLEAR_WORDS
    match = SessionFilter()
    summary = False
    seen: set[str] = set()
    index = 0
    while index < len(words):
        word = words[index]
        if word not in allowed:
            raise FilterError(f"unknown word {word!r}; usage: {USAGE[verb]}")
        if word in seen:
            raise FilterError(f"{word} given twice")
        seen.add(word)
        if word in _VALUED:
            if index + 1 >= len(words):
                raise FilterError(f"{word} needs a value")
            match = replace(match, **{_VALUED[word]: _value(word, words[index + 1])})
            index += 2
            continue
        if word == "summary":
            summary = True
        elif word == "tunnel":
            match = replace(match, tunnel=True)
        elif word == "all":
            match = replace(match, all=True)
        elif word == "resource-manager":
            match = replace(match, resource_manager=True)
        index += 1
    if verb == "clear":
        if not seen:
            raise FilterError(f"say what to clear; usage: {USAGE['clear']}")
        if "all" in seen and len(seen) > 1:
            raise FilterError("all takes no other filter")
    return match, summary
