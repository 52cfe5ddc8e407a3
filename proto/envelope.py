"""The msgpack envelope every bus message travels in, and the schema check of its body.

Wire form of a message:  {"v": SCHEMA_VERSION, "kind": "<kind>", "body": {...}}
Wire form of a reply:    {"v": SCHEMA_VERSION, "ok": true, "body": {...}}
                     or  {"v": SCHEMA_VERSION, "ok": false, "error": {"code": ..., "message": ...}}

A message kind is a dataclass registered with `@message("kind")`; decoding checks
the version, the kind and every field's presence and type, and raises `BusError`
with a stable code ("bad_encoding", "bad_version", "wrong_kind", "missing_field",
"bad_field") that handlers answer with and count as the drop reason.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

import msgpack

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20


class BusError(Exception):
    """A bus message or reply that could not be used; `code` is stable and countable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BusMessage:
    KIND: ClassVar[str] = ""


M = TypeVar("M", bound=BusMessage)
_REGISTRY: dict[str, type[BusMessage]] = {}


def message(kind: str) -> typing.Callable[[type[M]], type[M]]:
    """Register a dataclass as the schema of one message kind."""

    def register(cls: type[M]) -> type[M]:
        if kind in _REGISTRY:
            raise ValueError(f"message kind {kind!r} registered twice")
        cls = dataclass(frozen=True)(cls)
        cls.KIND = kind
        _REGISTRY[kind] = cls
        return cls

    return register


def kinds() -> dict[str, type[BusMessage]]:
    return dict(_REGISTRY)


# what msgpack takes as it is: no walk into these (pack runs once per bus message)
_PLAIN = (str, bytes, int, float, bool, type(None))
# the field names of each dataclass packed: dataclasses.fields() is slow per call
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _to_wire(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    cls = type(value)
    names = _FIELD_NAMES.get(cls)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(value))
    if names is not None:
        wire = {}
        for name in names:
            item = getattr(value, name)
            wire[name] = item if isinstance(item, _PLAIN) else _to_wire(item)
        return wire
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def pack(msg: BusMessage) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": msg.KIND, "body": _to_wire(msg)})


def pack_reply(body: BusMessage | dict[str, Any]) -> bytes:
    wire = _to_wire(body)
    return msgpack.packb({"v": SCHEMA_VERSION, "ok": True, "body": wire})


def pack_error(code: str, text: str) -> bytes:
    return msgpack.packb(
        {"v": SCHEMA_VERSION, "ok": False, "error": {"code": code, "message": text}}
    )


def _load(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BusError("too_large", f"{len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        decoded = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BusError("bad_encoding", f"body is not msgpack ({type(exc).__name__})") from None
    if not isinstance(decoded, dict):
        raise BusError("bad_encoding", "envelope is not a map")
    version = decoded.get("v")
    if version != SCHEMA_VERSION:
        raise BusError(
            "bad_version", f"schema version {version!r}, this side speaks {SCHEMA_VERSION}"
        )
    return decoded


def unpack(raw: bytes, expect: type[M]) -> M:
    """Decode an envelope and check it carries a well-formed `expect` message."""
    decoded = _load(raw)
    kind = decoded.get("kind")
    if kind != expect.KIND:
        raise BusError("wrong_kind", f"expected {expect.KIND!r}, got {kind!r}")
    return build(expect, decoded.get("body"))


def unpack_any(raw: bytes) -> BusMessage:
    decoded = _load(raw)
    cls = _REGISTRY.get(decoded.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise BusError("wrong_kind", f"unknown message kind {decoded.get('kind')!r}")
    return build(cls, decoded.get("body"))


def unpack_reply(raw: bytes, expect: type[M] | None = None) -> Any:
    """A reply body (as `expect` when given), or BusError carrying the remote error."""
    decoded = _load(raw)
    if decoded.get("ok") is True:
        body = decoded.get("body")
        return build(expect, body) if expect is not None else body
    error = decoded.get("error")
    if isinstance(error, dict):
        raise BusError(str(error.get("code", "remote_error")), str(error.get("message", "")))
    raise BusError("bad_encoding", "reply is neither ok nor error")


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    required: bool  # no default: a body without it is refused
    # the hint when it is one plain class: a value of exactly that type needs no more checks
    plain: type | None = None


# the fields of each message class with their resolved type hints: typing.get_type_hints
# is slow (it evaluates every annotation), and build() runs per bus message
_SCHEMAS: dict[type, tuple[_Field, ...]] = {}


def _schema(cls: type) -> tuple[_Field, ...]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = tuple(
            _Field(
                f.name,
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                hints[f.name] if hints[f.name] in _PLAIN else None,
            )
            for f in dataclasses.fields(cls)
        )
        _SCHEMAS[cls] = schema
    return schema


def build(cls: type[M], body: Any) -> M:
    name = getattr(cls, "KIND", "") or cls.__name__
    if not isinstance(body, dict):
        raise BusError("bad_field", f"{name} body is not a map")
    values: dict[str, Any] = {}
    for f in _schema(cls):
        if f.name not in body:
            if not f.required:
                continue
            raise BusError("missing_field", f"{name}.{f.name} is missing")
        value = body[f.name]
        if f.plain is not None and type(value) is f.plain:  # most fields of most messages
            values[f.name] = value
        else:
            values[f.name] = _coerce(f.hint, value, f"{cls.__name__}.{f.name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except BusError as exc:
                errors.append(exc.message)
        raise BusError("bad_field", f"{where}: {errors[0] if errors else 'bad value'}")
    if origin is list:
        if not isinstance(value, list):
            raise BusError("bad_field", f"{where} must be a list")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(item, v, f"{where}[]") for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise BusError("bad_field", f"{where} must be a map")
        return value
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise BusError("bad_field", f"{where} must be int")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise BusError("bad_field", f"{where} must be {hint.__name__}, got {type(value).__name__}")
    return value
