"""Value kinds of the configuration schema: each parses one TOML value or says why not.

A kind's `parse` returns the normalised value or raises `ValueRefused` with a
sentence an operator can act on ("out of range 0-100"); the loader adds the key
path and the value. `describe` feeds `ikefarm config reference` and the README.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SHOWN_CHARS = 48  # a value longer than this is shown cut, with its length
MAX_LIST_ITEMS = 1024  # a list option holds at most this many values


class ValueRefused(ValueError):
    """A value that does not fit its kind; the text says what would."""


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str) -> str:
    """`text` on one line: control, line and paragraph separators as escapes."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable():
            out.append(char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return "".join(out)


def one_line(text: str, limit: int) -> str:
    """`text` printable and cut at `limit` characters, saying how long it was."""
    if len(text) > limit:
        return f"{printable(text[:limit])}... ({len(text)} characters)"
    return printable(text)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def show_value(raw: Any) -> str:
    """A TOML value for an error message: short values whole, long ones cut with their length.

    Never recurses into containers, so a value nested thousands deep or a list of a
    million items is named in a few characters.
    """
    if isinstance(raw, str):
        if len(raw) > SHOWN_CHARS:
            return f"{_quoted(raw[: SHOWN_CHARS - 16] + '...')} ({len(raw)} characters)"
        return _quoted(raw)
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        text = str(raw)
        return text if len(text) <= SHOWN_CHARS else f"an integer of {len(text)} digits"
    if isinstance(raw, datetime.date | datetime.time):
        return raw.isoformat()
    if isinstance(raw, list):
        if not raw:
            return "[]"
        if len(raw) <= 8 and not any(isinstance(item, list | Mapping) for item in raw):
            text = "[" + ", ".join(show_value(item) for item in raw) + "]"
            if len(text) <= SHOWN_CHARS:
                return text
        return f"[... {_plural(len(raw), 'item')}]"
    if isinstance(raw, Mapping):
        if not raw:
            return "{}"
        return f"{{... {_plural(len(raw), 'key')}}}"
    return one_line(repr(raw), SHOWN_CHARS)


def _quoted(text: str) -> str:
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def show_key(key: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted (and cut when long)."""
    return key if _BARE_KEY.fullmatch(key) else show_value(key)


@dataclass(frozen=True)
class Secret:
    """Key material from the config; never printed, never put on the bus."""

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Secret(<{len(self.value)} bytes>)"

    def __str__(self) -> str:
        return "<secret>"


class Kind:
    default: Any = None
    doc: str = ""

    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def render(self, value: Any) -> Any:
        """The value as TOML would carry it (for `config check` output)."""
        return value


def _number_text(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Int(Kind):
    minimum: int | None = None
    maximum: int | None = None
    default: int | None = None
    doc: str = ""

    def parse(self, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueRefused(f"must be an integer{self._range_text()}")
        self._check_range(raw)
        return raw

    def _check_range(self, value: int) -> None:
        too_low = self.minimum is not None and value < self.minimum
        too_high = self.maximum is not None and value > self.maximum
        if too_low or too_high:
            raise ValueRefused(f"out of range{self._range_text()}")

    def _range_text(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f" {self.minimum}-{self.maximum}"
        if self.minimum is not None:
            return f" {self.minimum} or more"
        if self.maximum is not None:
            return f" up to {self.maximum}"
        return ""

    def describe(self) -> str:
        return f"integer{self._range_text()}"


@dataclass
class Float(Kind):
    minimum: float = 0.0
    maximum: float = 0.0
    decimals: int = 3
    default: float | None = None
    doc: str = ""

    def parse(self, raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueRefused(f"must be a number {self._range_text()}")
        value = float(raw)
        if not self.minimum <= value <= self.maximum:
            raise ValueRefused(f"out of range {self._range_text()}")
        if round(value, self.decimals) != value:
            raise ValueRefused(f"at most {self.decimals} decimals")
        return value

    def _range_text(self) -> str:
        fmt = f"{{:.{self.decimals}f}}"
        return f"{fmt.format(self.minimum)}-{fmt.format(self.maximum)}"

    def describe(self) -> str:
        return f"decimal {self._range_text()}"


@dataclass
class Bool(Kind):
    default: bool | None = None
    doc: str = ""

    def parse(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise ValueRefused("must be true or false")
        return raw

    def describe(self) -> str:
        return "true | false"


@dataclass
class Choice(Kind):
    choices: Sequence[str] = ()
    default: str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str) or raw not in self.choices:
            raise ValueRefused(f"must be one of {', '.join(self.choices)}")
        return raw

    def describe(self) -> str:
        return " | ".join(self.choices)


@dataclass
class Text(Kind):
    default: str | None = None
    pattern: str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueRefused("must be a string")
        if self.pattern is not None and not re.fullmatch(self.pattern, raw):
            raise ValueRefused(f"must match {self.pattern}")
        return raw

    def describe(self) -> str:
        return "string"


@dataclass
class IntOrKeyword(Kind):
    """An integer or one keyword, like vSR's `cookie-threshold 12 | always`."""

    keywords: Sequence[str] = ()
    minimum: int | None = 0
    maximum: int | None = None
    default: int | str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> int | str:
        if isinstance(raw, str) and raw in self.keywords:
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueRefused(f"must be {self.describe()}")
        Int(self.minimum, self.maximum).parse(raw)
        return raw

    def describe(self) -> str:
        words = " | ".join(f'"{k}"' for k in self.keywords)
        return f"{Int(self.minimum, self.maximum).describe()} | {words}"


@dataclass
class LevelOrDisable(IntOrKeyword):
    keywords: Sequence[str] = ("disable",)
    minimum: int | None = 0
    maximum: int | None = 4


# digit counts bounded: int() of a longer run is slow or refused (sys.int_info), and none fits
_DURATION = re.compile(r"^\s*(\d{1,15})\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass
class Duration(Kind):
    """A time duration as vSR writes it: `10s`, `5m`, `4h`, `1d`, or plain seconds."""

    minimum: float = 0
    maximum: float = 365 * 86400
    default: float | None = None
    doc: str = ""

    def parse(self, raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueRefused(self._shape())
        if isinstance(raw, int | float):
            seconds = float(raw)
        elif isinstance(raw, str) and (match := _DURATION.match(raw)):
            seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        else:
            raise ValueRefused(self._shape())
        if not self.minimum <= seconds <= self.maximum:
            raise ValueRefused(f"out of range {_number_text(self.minimum)}s-{self.maximum:g}s")
        return float(seconds)

    def _shape(self) -> str:
        return 'must be a duration such as "10s", "5m", "4h", "1d" or a number of seconds'

    def describe(self) -> str:
        return f"duration {_number_text(self.minimum)}s-{self.maximum:g}s"

    def render(self, value: Any) -> Any:
        return f"{value:g}s"


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds}"


@dataclass
class RateKind(Kind):
    """Junos `[count]/[duration in seconds]`, each part 1-86400."""

    default: Rate | None = None
    doc: str = ""

    def parse(self, raw: Any) -> Rate:
        text = raw if isinstance(raw, str) else ""
        match = re.fullmatch(r"\s*(\d{1,15})\s*/\s*(\d{1,15})\s*", text)
        if not match:
            raise ValueRefused('must be "count/seconds", each part 1-86400')
        count, seconds = int(match.group(1)), int(match.group(2))
        if not (1 <= count <= 86400 and 1 <= seconds <= 86400):
            raise ValueRefused("out of range: count 1-86400 / seconds 1-86400")
        return Rate(count, seconds)

    def describe(self) -> str:
        return '"count/seconds", each 1-86400'

    def render(self, value: Any) -> Any:
        return str(value)


def decode_secret(raw: str) -> bytes:
    """vSR/strongSwan secret encodings: `0x` hex, `0s` base64, otherwise the text itself."""
    if raw.startswith(("0x", "0X")):
        try:
            return bytes.fromhex(raw[2:])
        except ValueError:
            raise ValueRefused("0x secret is not valid hex") from None
    if raw.startswith("0s"):
        try:
            return base64.b64decode(raw[2:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueRefused("0s secret is not valid base64") from None
    return raw.encode()


@dataclass
class SecretKind(Kind):
    default: None = None
    doc: str = ""

    def parse(self, raw: Any) -> Secret:
        if not isinstance(raw, str) or not raw:
            raise ValueRefused('must be a non-empty string: plain text, "0x" hex or "0s" base64')
        value = decode_secret(raw)
        if not value:
            raise ValueRefused("secret decodes to nothing")
        return Secret(value)

    def describe(self) -> str:
        return 'secret: plain text, "0x" hex or "0s" base64'

    def render(self, value: Any) -> Any:
        return "<masked>"


@dataclass
class Address(Kind):
    """An IP address, optionally also the keyword `any` (remote-address)."""

    allow_any: bool = False
    default: str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if self.allow_any and raw == "any":
            return raw
        if not isinstance(raw, str):
            raise ValueRefused("must be an IP address string")
        try:
            return str(ipaddress.ip_address(raw))
        except ValueError:
            raise ValueRefused("is not an IP address") from None

    def describe(self) -> str:
        return "IPv4/IPv6 address" + (' | "any"' if self.allow_any else "")


class ListenAddressError(ValueError):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDRESS:PORT` or `[IPv6]:PORT` -> (address, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ListenAddressError("must be ADDRESS:PORT ([IPv6]:PORT)")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ListenAddressError("an IPv6 address goes in brackets: [ADDRESS]:PORT")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ListenAddressError(f"{host!r} is not an IP address") from None
    if bracketed and address.version != 6:
        raise ListenAddressError("brackets are for an IPv6 address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ListenAddressError(f"port {port_text!r} is not 1-65535")
    return str(address), int(port_text)


def format_listen(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass
class ListenEndpoint(Kind):
    """`ADDRESS:PORT` (`[IPv6]:PORT`) a service listens on, or "" for none."""

    default: str | None = ""
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueRefused('must be "ADDRESS:PORT" or ""')
        if raw == "":
            return raw
        try:
            return format_listen(*parse_listen(raw))
        except ListenAddressError as exc:
            raise ValueRefused(str(exc)) from None

    def describe(self) -> str:
        return 'ADDRESS:PORT | "" (off)'


@dataclass
class Network(Kind):
    default: str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueRefused("must be a subnet string such as 10.0.0.0/24")
        try:
            return str(ipaddress.ip_network(raw, strict=False))
        except ValueError:
            raise ValueRefused("is not a subnet such as 10.0.0.0/24") from None

    def describe(self) -> str:
        return "subnet (a.b.c.d/len or x::/len)"


@dataclass
class AddressRange(Kind):
    """A pool entry: a single address, a range `a-b`, or a subnet."""

    default: str | None = None
    doc: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueRefused("must be an address, a range a-b or a subnet")
        try:
            if "-" in raw:
                first, last = (ipaddress.ip_address(p.strip()) for p in raw.split("-", 1))
                if first.version != last.version or int(first) > int(last):
                    raise ValueRefused("range must go from low to high within one family")
                return f"{first}-{last}"
            if "/" in raw:
                return str(ipaddress.ip_network(raw, strict=False))
            return str(ipaddress.ip_address(raw))
        except ValueError as exc:
            if isinstance(exc, ValueRefused):
                raise
            raise ValueRefused("is not an address, a range a-b or a subnet") from None

    def describe(self) -> str:
        return "address | range a-b | subnet"


@dataclass
class ListOf(Kind):
    item: Kind = field(default_factory=Text)
    default: list[Any] | None = None
    min_items: int = 0
    single_ok: bool = True  # a lone value counts as a one-item list
    doc: str = ""
    max_items: int = MAX_LIST_ITEMS

    def parse(self, raw: Any) -> list[Any]:
        if not isinstance(raw, list):
            if not self.single_ok:
                raise ValueRefused("must be a list")
            raw = [raw]
        if len(raw) < self.min_items:
            raise ValueRefused(f"needs at least {self.min_items} item(s)")
        if len(raw) > self.max_items:
            raise ValueRefused(f"has more than the {self.max_items} items allowed")
        parsed = []
        for index, item in enumerate(raw):
            try:
                parsed.append(self.item.parse(item))
            except ValueRefused as exc:
                raise ValueRefused(f"item {index} {show_value(item)} {exc}") from None
        return parsed

    def describe(self) -> str:
        return f"list of {self.item.describe()}"

    def render(self, value: Any) -> Any:
        return [self.item.render(v) for v in value]
