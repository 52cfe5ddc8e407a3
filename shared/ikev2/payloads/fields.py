"""Declarative field tables for fixed-size wire structures.

A wire structure (payload body, substructure, header) declares its leading
fixed fields once, as a table of ``(name, format)`` pairs in wire order, with
big-endian ``struct`` formats:

    FieldTable("ke", ("dh_group", "H"), ("reserved", "2x"))

- ``B``/``H``/``I``/``Q``: unsigned integers of 1/2/4/8 octets;
- ``Ns``: an N-octet byte string (SPIs in the IKE header);
- ``Nx``: N reserved octets: skipped on receipt, zero on send (RFC 7296 3.2);
  the name of a reserved entry is documentation only.

`unpack` bounds-checks before reading and raises `MalformedMessage` with the
reason ``truncated_<table name>``; `pack` refuses out-of-range values with a
plain `ValueError` (a bug on our side, not bad input).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import Any, TypeVar

from ikefarm.shared.ikev2.errors import MalformedMessage

_FORMAT = re.compile(r"^(?:[BHIQx]|[1-9][0-9]*[sx])$")

FieldValue = int | bytes
E = TypeVar("E", bound=IntEnum)


class FieldTable:
    """The fixed leading fields of one wire structure, in wire order."""

    __slots__ = ("_struct", "fields", "name", "names", "size")

    def __init__(self, name: str, *fields: tuple[str, str]) -> None:
        for field_name, fmt in fields:
            if not _FORMAT.match(fmt):
                raise ValueError(f"{name}.{field_name}: unsupported wire format {fmt!r}")
        self.name = name
        self.fields = fields
        self.names: tuple[str, ...] = tuple(n for n, fmt in fields if not fmt.endswith("x"))
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: duplicate field names")
        self._struct = struct.Struct(">" + "".join(fmt for _, fmt in fields))
        self.size: int = self._struct.size

    def pack(self, values: Mapping[str, FieldValue]) -> bytes:
        try:
            return self._struct.pack(*(values[n] for n in self.names))
        except (struct.error, KeyError) as exc:
            raise ValueError(f"cannot encode {self.name}: {exc}") from None

    def pack_values(self, *values: FieldValue) -> bytes:
        """As `pack`, the values given in `names` order."""
        try:
            return self._struct.pack(*values)
        except struct.error as exc:
            raise ValueError(f"cannot encode {self.name}: {exc}") from None

    def unpack(self, data: bytes, offset: int = 0, end: int | None = None) -> dict[str, Any]:
        """Read the fields at `offset`, within `data[:end]` (the enclosing structure)."""
        return dict(zip(self.names, self.unpack_values(data, offset, end), strict=True))

    def unpack_values(
        self, data: bytes, offset: int = 0, end: int | None = None
    ) -> tuple[FieldValue, ...]:
        """As `unpack`, the values as a tuple in `names` order (no dict: for the hot
        substructures, transforms and their attributes, of which a proposal has dozens)."""
        limit = len(data) if end is None else min(end, len(data))
        if offset < 0 or limit - offset < self.size:
            raise MalformedMessage(
                f"truncated_{self.name}",
                f"{max(limit - offset, 0)} octets, need {self.size}",
            )
        return self._struct.unpack_from(data, offset)


def as_enum(enum_type: type[E], value: int) -> E | int:
    """`value` as a member of `enum_type` when it is a known number, else the plain int."""
    # the members by value (a dict lookup) before the enum's call, which is ~20 times
    # slower and runs for every transform, payload and notify type of a message
    member = enum_type._value2member_map_.get(value)
    if member is not None:
        return member
    try:
        return enum_type(value)
    except ValueError:
        return value
