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


# per class: the field names of a dataclass, or None for any other type (made once: the
# dataclasses helpers cost microseconds per call, and every bus message comes here)
_WIRE_FIELDS: dict[type, tuple[str, ...] | None] = {}
_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def _to_wire(value: Any) -> Any:
    cls = type(value)
    if cls in _SCALARS:
        return value
    names = _WIRE_FIELDS.get(cls, ())
    if names == ():
        names = _WIRE_FIELDS[cls] = (
            tuple(f.name for f in dataclasses.fields(value))
            if dataclasses.is_dataclass(value) and not isinstance(value, type)
            else None
        )
    if names is not None:
        return {name: _to_wire(getattr(value, name)) for name in names}
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


Check = typing.Callable[[Any, str], Any]  # (wire value, where) -> field value, or BusError


@dataclass(frozen=True)
class _Field:
    name: str
    check: Check  # made from the field's type hint, once per class
    required: bool  # no default: a body without it is refused
    where: str  # "Class.field", for error messages


# the fields of each message class with a checker compiled from each type hint:
# typing.get_type_hints and get_origin are slow, and build() runs per bus message
_SCHEMAS: dict[type, tuple[_Field, ...]] = {}


def _schema(cls: type) -> tuple[_Field, ...]:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls)
        schema = tuple(
            _Field(
                f.name,
                _checker(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                f"{cls.__name__}.{f.name}",
            )
            for f in dataclasses.fields(cls)
        )
        _SCHEMAS[cls] = schema
    return schema


def build(cls: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        name = getattr(cls, "KIND", "") or cls.__name__
        raise BusError("bad_field", f"{name} body is not a map")
    values: dict[str, Any] = {}
    for f in _schema(cls):
        if f.name not in body:
            if not f.required:
                continue
            name = getattr(cls, "KIND", "") or cls.__name__
            raise BusError("missing_field", f"{name}.{f.name} is missing")
        values[f.name] = f.check(body[f.name], f.where)
    return cls(**values)


def _any(value: Any, _where: str) -> Any:
    return value


def _checker(hint: Any) -> Check:
    """A function that checks (and where needed converts) a wire value for type `hint`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        nullable = type(None) in options
        checks = [_checker(option) for option in options if option is not type(None)]

        def check_union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            errors = []
            for check in checks:
                try:
                    return check(value, where)
                except BusError as exc:
                    errors.append(exc.message)
            raise BusError("bad_field", f"{where}: {errors[0] if errors else 'bad value'}")

        return check_union
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        check_item = _checker(item)

        def check_list(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise BusError("bad_field", f"{where} must be a list")
            inner = f"{where}[]"
            return [check_item(v, inner) for v in value]

        return check_list
    if origin is dict:

        def check_dict(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise BusError("bad_field", f"{where} must be a map")
            return value

        return check_dict
    if hint is Any:
        return _any
    if dataclasses.is_dataclass(hint):
        return lambda value, _where: build(hint, value)  # type: ignore[arg-type]
    if hint is float:

        def check_float(value: Any, where: str) -> Any:
            if type(value) is float:
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if not isinstance(value, float):
                raise BusError("bad_field", f"{where} must be float, got {type(value).__name__}")
            return value

        return check_float
    if isinstance(hint, type):
        exact = hint

        def check_type(value: Any, where: str) -> Any:
            if type(value) is exact:
                return value
            if exact is int and isinstance(value, bool):
                raise BusError("bad_field", f"{where} must be int")
            if not isinstance(value, exact):
                raise BusError(
                    "bad_field", f"{where} must be {exact.__name__}, got {type(value).__name__}"
                )
            return value

        return check_type
    return _any
