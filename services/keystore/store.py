"""The keystore's secrets at rest: one file, AES-256-GCM under a key derived from the master key.

Every long-term secret the keystore holds lives here as a `StoredSecret` (kind,
name, public attributes, secret octets, origin): PSKs and PPKs imported from the
configuration, the keystore's own bus transport key, and later private keys and
trust anchors. Only the keystore process ever opens this file.

File layout (all integers big-endian):

    magic    16 octets  b"IKEFARM-KEYSTORE"
    version   1 octet   1
    salt     16 octets  fresh random on every write
    nonce    12 octets  fresh random on every write
    sealed   rest       AES-256-GCM(key, nonce, msgpack(entries), aad = magic|version|salt)

    key = HKDF-SHA256(master key, salt, info = b"ikefarm keystore v1", 32 octets)

The master key comes from the file `[keystore] master-key-file` (readable by
its owner only, like ssh's keys: a mode with group or other bits is refused) or,
when that is unset, from the environment variable named by `master-key-env`;
under `ikefarm up` the supervisor takes that variable out of every environment
and hands the key to the keystore alone through a pipe (`receive_master_key`).
All accept the secret encodings of the configuration (plain text, `0x` hex,
`0s` base64) and must give at least 16 octets. A missing master key, a wrong one (the GCM
tag does not verify) or a damaged file is a `KeystoreLocked` error naming the
cause, never the key; the file is then left exactly as it was. Writes go to a
temporary file (mode 0600) renamed over the old one, so a crash never leaves a
half-written store.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ikefarm.shared.config.kinds import ValueRefused, decode_secret
from ikefarm.shared.config.loader import Config

MAGIC = b"IKEFARM-KEYSTORE"
VERSION = 1
SALT_SIZE = 16
NONCE_SIZE = 12
KEY_INFO = b"ikefarm keystore v1"
MIN_MASTER_KEY = 16
STORE_FILE = "keystore.bin"

ORIGIN_CONFIG = "config"  # re-imported from the configuration at every start
ORIGIN_GENERATED = "generated"  # made by the keystore itself; kept across restarts


class KeystoreLocked(RuntimeError):
    """The store cannot be opened: missing or wrong master key, unreadable or damaged file."""


@dataclass(frozen=True)
class StoredSecret:
    """One secret and what may be said about it; `repr` shows the length of the secret only."""

    kind: str  # "psk", "ppk", "transport-key", "private-key"
    name: str
    secret: bytes = field(repr=False)
    attributes: dict[str, Any] = field(default_factory=dict)
    origin: str = ORIGIN_CONFIG

    def __repr__(self) -> str:
        return (
            f"StoredSecret(kind={self.kind!r}, name={self.name!r}, "
            f"secret=<{len(self.secret)} octets>, origin={self.origin!r})"
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "secret": self.secret,
            "attributes": self.attributes,
            "origin": self.origin,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> StoredSecret:
        if not isinstance(raw, dict):
            raise KeystoreLocked("keystore file is damaged: an entry is not a map")
        try:
            return cls(
                kind=str(raw["kind"]),
                name=str(raw["name"]),
                secret=bytes(raw["secret"]),
                attributes=dict(raw.get("attributes") or {}),
                origin=str(raw.get("origin", ORIGIN_CONFIG)),
            )
        except (KeyError, TypeError, ValueError):
            raise KeystoreLocked("keystore file is damaged: an entry lacks a field") from None


def store_path(config: Config) -> Path:
    """`[keystore] store-file`, else `<state-dir>/keystore.bin`."""
    from ikefarm.shared.bus.embedded import default_state_dir

    configured = config.keystore.store_file
    if configured:
        return Path(configured)
    state_dir = config.farm.state_dir
    return (Path(state_dir) if state_dir else default_state_dir()) / STORE_FILE


# what this process was handed once at start (`receive_master_key`), and where it came from
_received: bytearray | None = None
_received_from = ""
MAX_MASTER_KEY_TEXT = 4096  # characters; far beyond any encoding of a sane key


def master_key_variables(config: Config) -> list[str]:
    """The environment variables that may carry the master key: the configured one and the
    default name, which no process but the keystore has any use for."""
    names = [config.keystore.master_key_env or "", "IKEFARM_MASTER_KEY"]
    return [name for name in dict.fromkeys(names) if name]


def receive_master_key(config: Config, fd: int | None = None) -> None:
    """Take the master key into this process once, at start, and leave no copy behind.

    With `fd` (the pipe `ikefarm up` hands the keystore): read it to its end and close it.
    Without, and with no `master-key-file`: read the environment variable and delete it
    from this process's environment, so nothing started later inherits it. A read that
    fails is remembered as no key; `master_key` then says so."""
    global _received, _received_from
    if fd is not None:
        raw = bytearray()
        try:
            while len(raw) <= MAX_MASTER_KEY_TEXT:
                chunk = os.read(fd, MAX_MASTER_KEY_TEXT + 1)
                if not chunk:
                    break
                raw += chunk
        except OSError:
            raw = bytearray()
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        _received, _received_from = raw, f"the pipe from ikefarm up (fd {fd})"
    elif not config.keystore.master_key_file:
        variable = config.keystore.master_key_env
        value = os.environ.get(variable, "") if variable else ""
        if value:
            _received = bytearray(value.encode())
            _received_from = f"environment variable {variable}"
    for variable in master_key_variables(config):
        os.environ.pop(variable, None)


def received_master_key() -> bytearray | None:
    """A copy of the master key text `receive_master_key` took in, if it took one."""
    return None if _received is None else bytearray(_received)


def check_key_file_mode(path: Path, mode: int) -> None:
    """Refuse a key file others may read, in ssh's words."""
    if mode & 0o077:
        raise KeystoreLocked(
            f"permissions {stat.S_IMODE(mode):04o} for {path} are too open; "
            "it must be readable by its owner only (chmod 600)"
        )


def _text(raw: bytes, source: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise KeystoreLocked(f"master key in {source} is not UTF-8 text") from None


def _read_key_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            check_key_file_mode(Path(path), os.fstat(handle.fileno()).st_mode)
            return _text(handle.read(MAX_MASTER_KEY_TEXT + 1), f"file {path}")
    except OSError as exc:
        raise KeystoreLocked(
            f"cannot read the master key file {path} ([keystore] master-key-file): {exc.strerror}"
        ) from None


def master_key(config: Config, environ: dict[str, str] | None = None) -> bytes:
    """The master key this process received, else from its file or environment variable;
    KeystoreLocked says what is missing, never the key."""
    path = config.keystore.master_key_file
    variable = config.keystore.master_key_env
    if _received is not None:
        raw = _text(bytes(_received), _received_from).strip()
        source = _received_from
        if not raw:
            raise KeystoreLocked(f"no master key: nothing came through {source}")
    elif path:
        raw = _read_key_file(path).strip()
        source = f"file {path}"
    else:
        environ = dict(os.environ) if environ is None else environ
        raw = environ.get(variable, "").strip() if variable else ""
        if not raw:
            raise KeystoreLocked(
                "no master key: set [keystore] master-key-file, or the environment variable "
                f"{variable or '<[keystore] master-key-env>'}"
            )
        source = f"environment variable {variable}"
    if len(raw) > MAX_MASTER_KEY_TEXT:
        raise KeystoreLocked(
            f"master key in {source} is longer than {MAX_MASTER_KEY_TEXT} characters"
        )
    try:
        key = decode_secret(raw)
    except ValueRefused as exc:
        raise KeystoreLocked(f"master key in {source}: {exc}") from None
    if len(key) < MIN_MASTER_KEY:
        raise KeystoreLocked(
            f"master key in {source} is {len(key)} octets; at least {MIN_MASTER_KEY} are needed"
        )
    return key


def _file_key(master: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=KEY_INFO).derive(master)


class SecretStore:
    """The secrets by (kind, name), in insertion order; `save()` writes them sealed."""

    def __init__(self, path: Path, master: bytes, entries: Iterable[StoredSecret] = ()) -> None:
        self.path = path
        self._master = master
        self._entries: dict[tuple[str, str], StoredSecret] = {}
        for entry in entries:
            self._entries[(entry.kind, entry.name)] = entry

    def __repr__(self) -> str:
        return f"SecretStore({self.path}, {len(self._entries)} entries)"

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[StoredSecret]:
        return iter(list(self._entries.values()))

    @classmethod
    def open(cls, path: Path, master: bytes) -> SecretStore:
        """Read and decrypt `path`; an absent file is an empty store (first start)."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return cls(path, master)
        except OSError as exc:
            raise KeystoreLocked(f"cannot read keystore file {path}: {exc.strerror}") from None
        header = len(MAGIC) + 1 + SALT_SIZE
        if len(blob) < header + NONCE_SIZE + 16 or not blob.startswith(MAGIC):
            raise KeystoreLocked(f"{path} is not an ikefarm keystore file")
        if blob[len(MAGIC)] != VERSION:
            raise KeystoreLocked(f"{path}: keystore format {blob[len(MAGIC)]} is not {VERSION}")
        salt = blob[len(MAGIC) + 1 : header]
        nonce = blob[header : header + NONCE_SIZE]
        try:
            plain = AESGCM(_file_key(master, salt)).decrypt(
                nonce, blob[header + NONCE_SIZE :], blob[:header]
            )
        except InvalidTag:
            raise KeystoreLocked(
                f"wrong master key for {path} (or the file was altered); the file is left as it is"
            ) from None
        try:
            raw = msgpack.unpackb(plain, raw=False)
        except Exception:
            raise KeystoreLocked(f"{path}: sealed content is not readable") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
            raise KeystoreLocked(f"{path}: sealed content has no entry list")
        return cls(path, master, (StoredSecret.from_wire(e) for e in raw["entries"]))

    def save(self) -> None:
        salt = os.urandom(SALT_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        header = MAGIC + bytes([VERSION]) + salt
        plain = msgpack.packb({"entries": [e.to_wire() for e in self._entries.values()]})
        sealed = AESGCM(_file_key(self._master, salt)).encrypt(nonce, plain, header)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(header + nonce + sealed)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)

    def entries(self, kind: str) -> list[StoredSecret]:
        return [e for e in self._entries.values() if e.kind == kind]

    def get(self, kind: str, name: str) -> StoredSecret | None:
        return self._entries.get((kind, name))

    def put(self, entry: StoredSecret) -> None:
        self._entries[(entry.kind, entry.name)] = entry

    def replace_kind(self, kind: str, entries: Iterable[StoredSecret], origin: str) -> bool:
        """Make the `origin` entries of `kind` exactly `entries`; True when anything changed."""
        before = [e for e in self._entries.values() if e.kind == kind and e.origin == origin]
        wanted = list(entries)
        if before == wanted:
            return False
        for entry in before:
            del self._entries[(entry.kind, entry.name)]
        for entry in wanted:
            self._entries[(entry.kind, entry.name)] = entry
        return True
