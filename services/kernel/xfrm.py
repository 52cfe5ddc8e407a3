"""Linux XFRM netlink messages on pyroute2's `nlmsg`/`nla` classes, and a small XFRM socket.

pyroute2 ships no XFRM SA/SP API, so the message bodies and attributes the
kernel-netlink backend needs are declared here (laid out as the kernel's XFRM
user API defines them, see docs/kernel-netlink.md): SA add/update/delete (`XFRM_MSG_NEWSA`,
`UPDSA`, `DELSA`), counters (`GETSA`), policies (`NEWPOLICY`, `UPDPOLICY`,
`DELPOLICY`), SPD hash thresholds (`NEWSPDINFO`, `GETSPDINFO`) and the ACQUIRE
and EXPIRE notifications of the multicast groups.

Encoding is pure: `encode_*` take frozen specs and return the request bytes
(sequence number and port id as arguments), so a test can compare them byte for
byte with what iproute2 sends for the same SA. Decoding of anything the kernel
sends (`parse_messages`) first walks the netlink and attribute lengths itself
and raises `XfrmDecodeError` on any inconsistency, before pyroute2 reads a field.

Key material only ever sits in the request bytes handed to the socket; no repr,
log or exception here carries it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink import nla, nlmsg, nlmsgerr

from ikefarm.shared.xfrm_socket import USERPOLICY_INFO_SIZE

# -- constants of the kernel's netlink and XFRM user API ----------------------------------------

NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1

NLMSG_HDRLEN = 16
NLA_HDRLEN = 4

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NEWSPDINFO = 0x24
XFRM_MSG_GETSPDINFO = 0x25

# multicast groups (enum xfrm_nlgroups), joined with NETLINK_ADD_MEMBERSHIP
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2

XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
MODES = {"transport": XFRM_MODE_TRANSPORT, "tunnel": XFRM_MODE_TUNNEL}

XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
DIRECTIONS = {"in": XFRM_POLICY_IN, "out": XFRM_POLICY_OUT, "fwd": XFRM_POLICY_FWD}
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1

XFRM_STATE_ESN = 128
XFRM_INF = 0xFFFFFFFFFFFFFFFF
UDP_ENCAP_ESPINUDP = 2  # RFC 3948 ESP-in-UDP with the non-ESP marker scheme
IPPROTO_ESP = 50
PROTOCOLS = {"esp": IPPROTO_ESP}
MAX_REPLAY_WINDOW = 4096  # `replay-window` upper bound in the config schema
ALG_NAME_SIZE = 64

# attribute types (enum xfrm_attr_type_t)
XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_POLICY = 7
XFRMA_LTIME_VAL = 9
XFRMA_REPLAY_VAL = 10
XFRMA_SRCADDR = 13
XFRMA_LASTUSED = 15
XFRMA_POLICY_TYPE = 16
XFRMA_MIGRATE = 17
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_TFCPAD = 22
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_SA_EXTRA_FLAGS = 24
XFRMA_SET_MARK = 29
XFRMA_SET_MARK_MASK = 30
XFRMA_IF_ID = 31

# SPD info attributes (enum xfrm_spdattr_type_t)
XFRMA_SPD_INFO = 1
XFRMA_SPD_HINFO = 2
XFRMA_SPD_IPV4_HTHRESH = 3
XFRMA_SPD_IPV6_HTHRESH = 4


class XfrmDecodeError(ValueError):
    """Bytes from the kernel (or a fuzzer) that do not form the XFRM message they claim to be."""


class XfrmError(OSError):
    """The kernel refused a request: errno, its text and the extended-ack message if any."""

    def __init__(self, code: int, request: str, extack: str = "") -> None:
        self.request = request
        self.extack = extack
        name = errno.errorcode.get(code, str(code))
        text = f"kernel refused {request}: {os.strerror(code)} ({name})"
        if extack:
            text += f": {extack}"
        super().__init__(code, text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# -- struct layouts as pyroute2 field lists ---------------------------------------------------


def _selector_fields(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_selector (56 octets)."""
    return (
        (f"{prefix}daddr", "16s"),
        (f"{prefix}saddr", "16s"),
        (f"{prefix}dport", ">H"),
        (f"{prefix}dport_mask", ">H"),
        (f"{prefix}sport", ">H"),
        (f"{prefix}sport_mask", ">H"),
        (f"{prefix}family", "H"),
        (f"{prefix}prefixlen_d", "B"),
        (f"{prefix}prefixlen_s", "B"),
        (f"{prefix}proto", "B"),
        ("__pad", "3x"),
        (f"{prefix}ifindex", "i"),
        (f"{prefix}user", "I"),
    )


def _id_fields(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_id (24 octets): destination, SPI (network order), protocol."""
    return (
        (f"{prefix}daddr", "16s"),
        (f"{prefix}spi", ">I"),
        (f"{prefix}proto", "B"),
        ("__pad", "3x"),
    )


_LIFETIME_CFG_NAMES = (
    "soft_byte_limit",
    "hard_byte_limit",
    "soft_packet_limit",
    "hard_packet_limit",
    "soft_add_expires_seconds",
    "hard_add_expires_seconds",
    "soft_use_expires_seconds",
    "hard_use_expires_seconds",
)
_LIFETIME_CUR_NAMES = ("bytes", "packets", "add_time", "use_time")


def _lifetime_fields(prefix: str) -> tuple[tuple[str, str], ...]:
    """struct xfrm_lifetime_cfg (64) then struct xfrm_lifetime_cur (32)."""
    cfg = tuple((f"{prefix}lft_{n}", "Q") for n in _LIFETIME_CFG_NAMES)
    cur = tuple((f"{prefix}cur_{n}", "Q") for n in _LIFETIME_CUR_NAMES)
    return cfg + cur


_USERSA_INFO_FIELDS = (
    _selector_fields("sel_")
    + _id_fields("id_")
    + (("saddr", "16s"),)
    + _lifetime_fields("")
    + (
        ("stats_replay_window", "I"),
        ("stats_replay", "I"),
        ("stats_integrity_failed", "I"),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
        ("__pad", "7x"),
    )
)
USERSA_INFO_SIZE = 224

_USERPOLICY_INFO_FIELDS = (
    _selector_fields("sel_")
    + _lifetime_fields("")
    + (
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad", "4x"),
    )
)

USER_TMPL_FORMAT = struct.Struct("=16s4sB3xH2x16sIBBBxIII")  # struct xfrm_user_tmpl, 64
ALGO_FORMAT = struct.Struct("=64sI")  # struct xfrm_algo head, 68
ALGO_EXT_FORMAT = struct.Struct("=64sII")  # xfrm_algo_auth / xfrm_algo_aead head, 72
REPLAY_ESN_FORMAT = struct.Struct("=IIIIII")  # struct xfrm_replay_state_esn head, 24
USER_MIGRATE_FORMAT = struct.Struct("=16s16s16s16sBBHIHH")  # struct xfrm_user_migrate, 76
ENCAP_SIZE = 24
MARK_SIZE = 8
LIFETIME_CUR_SIZE = 32


# -- attributes ---------------------------------------------------------------------------------


class _raw_nla(nla):
    """An attribute whose payload is built/read by the message layer (value: bytes)."""

    __slots__ = ()
    fields = (("value", "s"),)

    def decode(self) -> None:
        nla.decode(self)
        self["value"] = bytes(self.data[self.offset + NLA_HDRLEN : self.offset + self.length])


class xfrm_encap_tmpl(nla):
    __slots__ = ()
    fields = (
        ("encap_type", "H"),
        ("encap_sport", ">H"),
        ("encap_dport", ">H"),
        ("__pad", "2x"),
        ("encap_oa", "16s"),
    )


class xfrm_mark(nla):
    __slots__ = ()
    fields = (("v", "I"), ("m", "I"))


class xfrm_lifetime_cur(nla):
    __slots__ = ()
    fields = tuple((n, "Q") for n in _LIFETIME_CUR_NAMES)


class xfrm_userpolicy_type(nla):
    __slots__ = ()
    fields = (("type", "B"), ("__pad", "3x"))


class xfrmu_spdhthresh(nla):
    __slots__ = ()
    fields = (("lbits", "B"), ("rbits", "B"))


_XFRMA_NLA_MAP = (
    (XFRMA_ALG_AUTH, "XFRMA_ALG_AUTH", "_raw_nla"),
    (XFRMA_ALG_CRYPT, "XFRMA_ALG_CRYPT", "_raw_nla"),
    (XFRMA_ENCAP, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
    (XFRMA_TMPL, "XFRMA_TMPL", "_raw_nla"),
    (XFRMA_SA, "XFRMA_SA", "_raw_nla"),
    (XFRMA_POLICY, "XFRMA_POLICY", "_raw_nla"),
    (XFRMA_LTIME_VAL, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
    (XFRMA_REPLAY_VAL, "XFRMA_REPLAY_VAL", "_raw_nla"),
    (XFRMA_SRCADDR, "XFRMA_SRCADDR", "_raw_nla"),
    (XFRMA_LASTUSED, "XFRMA_LASTUSED", "uint64"),
    (XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
    (XFRMA_MIGRATE, "XFRMA_MIGRATE", "_raw_nla"),
    (XFRMA_ALG_AEAD, "XFRMA_ALG_AEAD", "_raw_nla"),
    (XFRMA_ALG_AUTH_TRUNC, "XFRMA_ALG_AUTH_TRUNC", "_raw_nla"),
    (XFRMA_MARK, "XFRMA_MARK", "xfrm_mark"),
    (XFRMA_TFCPAD, "XFRMA_TFCPAD", "uint32"),
    (XFRMA_REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "_raw_nla"),
    (XFRMA_SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
    (XFRMA_SET_MARK, "XFRMA_SET_MARK", "uint32"),
    (XFRMA_SET_MARK_MASK, "XFRMA_SET_MARK_MASK", "uint32"),
    (XFRMA_IF_ID, "XFRMA_IF_ID", "uint32"),
)


class _xfrm_msg(nlmsg):
    __slots__ = ()
    nla_map = _XFRMA_NLA_MAP
    _raw_nla = _raw_nla
    xfrm_encap_tmpl = xfrm_encap_tmpl
    xfrm_mark = xfrm_mark
    xfrm_lifetime_cur = xfrm_lifetime_cur
    xfrm_userpolicy_type = xfrm_userpolicy_type


class xfrm_usersa_info(_xfrm_msg):
    """XFRM_MSG_NEWSA / UPDSA body, and each SA of a GETSA dump."""

    __slots__ = ()
    fields = _USERSA_INFO_FIELDS


class xfrm_usersa_id(_xfrm_msg):
    """XFRM_MSG_DELSA / GETSA body: destination, SPI, family, protocol (24 octets)."""

    __slots__ = ()
    fields = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "1x"))


class xfrm_userpolicy_info(_xfrm_msg):
    __slots__ = ()
    fields = _USERPOLICY_INFO_FIELDS


class xfrm_userpolicy_id(_xfrm_msg):
    __slots__ = ()
    fields = (*_selector_fields("sel_"), ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_user_acquire(_xfrm_msg):
    """XFRM_MSG_ACQUIRE: a policy matched traffic with no SA (trap)."""

    __slots__ = ()
    fields = (
        *_id_fields("id_"),
        ("saddr", "16s"),
        *_selector_fields("sel_"),
        *((n if n.startswith("__") else f"policy_{n}", f) for n, f in _USERPOLICY_INFO_FIELDS),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
        ("seq", "I"),
    )


class xfrm_user_expire(_xfrm_msg):
    """XFRM_MSG_EXPIRE: an SA reached its soft (hard=0) or hard (hard=1) lifetime."""

    __slots__ = ()
    fields = (*_USERSA_INFO_FIELDS, ("hard", "B"), ("__pad", "7x"))


class xfrm_spdinfo(nlmsg):
    """XFRM_MSG_NEWSPDINFO / GETSPDINFO body: a u32 of flags, then the SPD attributes."""

    __slots__ = ()
    fields = (("flags", "I"),)
    nla_map = (
        (XFRMA_SPD_INFO, "XFRMA_SPD_INFO", "_raw_nla"),
        (XFRMA_SPD_HINFO, "XFRMA_SPD_HINFO", "_raw_nla"),
        (XFRMA_SPD_IPV4_HTHRESH, "XFRMA_SPD_IPV4_HTHRESH", "xfrmu_spdhthresh"),
        (XFRMA_SPD_IPV6_HTHRESH, "XFRMA_SPD_IPV6_HTHRESH", "xfrmu_spdhthresh"),
    )
    _raw_nla = _raw_nla
    xfrmu_spdhthresh = xfrmu_spdhthresh


USERSA_ID_SIZE = 24
USERPOLICY_ID_SIZE = 64
USER_ACQUIRE_SIZE = 280
USER_EXPIRE_SIZE = 232

BODY_CLASSES: dict[int, tuple[type[nlmsg], int]] = {
    XFRM_MSG_NEWSA: (xfrm_usersa_info, USERSA_INFO_SIZE),
    XFRM_MSG_UPDSA: (xfrm_usersa_info, USERSA_INFO_SIZE),
    XFRM_MSG_DELSA: (xfrm_usersa_id, USERSA_ID_SIZE),
    XFRM_MSG_GETSA: (xfrm_usersa_id, USERSA_ID_SIZE),
    XFRM_MSG_NEWPOLICY: (xfrm_userpolicy_info, USERPOLICY_INFO_SIZE),
    XFRM_MSG_UPDPOLICY: (xfrm_userpolicy_info, USERPOLICY_INFO_SIZE),
    XFRM_MSG_DELPOLICY: (xfrm_userpolicy_id, USERPOLICY_ID_SIZE),
    XFRM_MSG_GETPOLICY: (xfrm_userpolicy_id, USERPOLICY_ID_SIZE),
    XFRM_MSG_ACQUIRE: (xfrm_user_acquire, USER_ACQUIRE_SIZE),
    XFRM_MSG_EXPIRE: (xfrm_user_expire, USER_EXPIRE_SIZE),
    XFRM_MSG_NEWSPDINFO: (xfrm_spdinfo, 4),
    XFRM_MSG_GETSPDINFO: (xfrm_spdinfo, 4),
}

MESSAGE_NAMES = {
    XFRM_MSG_NEWSA: "XFRM_MSG_NEWSA",
    XFRM_MSG_UPDSA: "XFRM_MSG_UPDSA",
    XFRM_MSG_DELSA: "XFRM_MSG_DELSA",
    XFRM_MSG_GETSA: "XFRM_MSG_GETSA",
    XFRM_MSG_NEWPOLICY: "XFRM_MSG_NEWPOLICY",
    XFRM_MSG_UPDPOLICY: "XFRM_MSG_UPDPOLICY",
    XFRM_MSG_DELPOLICY: "XFRM_MSG_DELPOLICY",
    XFRM_MSG_GETPOLICY: "XFRM_MSG_GETPOLICY",
    XFRM_MSG_ACQUIRE: "XFRM_MSG_ACQUIRE",
    XFRM_MSG_EXPIRE: "XFRM_MSG_EXPIRE",
    XFRM_MSG_NEWSPDINFO: "XFRM_MSG_NEWSPDINFO",
    XFRM_MSG_GETSPDINFO: "XFRM_MSG_GETSPDINFO",
}


def _check_layouts() -> None:
    """Each declared body has the size of its C struct (caught at import, not on the wire)."""
    for cls, size in set(BODY_CLASSES.values()):
        fmt = "=" + "".join(f.lstrip("=<>!") for _, f in cls.fields)
        if struct.calcsize(fmt) != size:
            raise AssertionError(f"{cls.__name__} is {struct.calcsize(fmt)} octets, not {size}")


_check_layouts()


# -- specs --------------------------------------------------------------------------------------


def _family(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _packed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return address.packed.ljust(16, b"\0")


@dataclass(frozen=True)
class Selector:
    """Traffic selector of a policy (or of a transport-mode SA): prefixes, protocol, ports."""

    src: str
    dst: str
    proto: int = 0
    sport: int = 0
    dport: int = 0
    ifindex: int = 0

    def __post_init__(self) -> None:
        src = ipaddress.ip_network(self.src, strict=False)
        dst = ipaddress.ip_network(self.dst, strict=False)
        if src.version != dst.version:
            raise ValueError("selector source and destination are of different families")
        if not 0 <= self.proto <= 255 or not all(
            0 <= p <= 0xFFFF for p in (self.sport, self.dport)
        ):
            raise ValueError("selector protocol or port out of range")

    def fields(self, prefix: str = "sel_") -> dict[str, Any]:
        src = ipaddress.ip_network(self.src, strict=False)
        dst = ipaddress.ip_network(self.dst, strict=False)
        if src.version != dst.version:
            raise ValueError("selector source and destination are of different families")
        return {
            f"{prefix}daddr": _packed(dst.network_address),
            f"{prefix}saddr": _packed(src.network_address),
            f"{prefix}dport": self.dport,
            f"{prefix}dport_mask": 0xFFFF if self.dport else 0,
            f"{prefix}sport": self.sport,
            f"{prefix}sport_mask": 0xFFFF if self.sport else 0,
            f"{prefix}family": _family(src.network_address),
            f"{prefix}prefixlen_d": dst.prefixlen,
            f"{prefix}prefixlen_s": src.prefixlen,
            f"{prefix}proto": self.proto,
            f"{prefix}ifindex": self.ifindex,
            f"{prefix}user": 0,
        }


@dataclass(frozen=True)
class Lifetime:
    """Soft/hard limits of an SA; 0 = no limit (encoded as XFRM_INF for bytes and packets)."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_seconds: int = 0
    hard_seconds: int = 0

    def fields(self) -> dict[str, Any]:
        def limit(value: int) -> int:
            return value if value else XFRM_INF

        return {
            "lft_soft_byte_limit": limit(self.soft_bytes),
            "lft_hard_byte_limit": limit(self.hard_bytes),
            "lft_soft_packet_limit": limit(self.soft_packets),
            "lft_hard_packet_limit": limit(self.hard_packets),
            "lft_soft_add_expires_seconds": self.soft_seconds,
            "lft_hard_add_expires_seconds": self.hard_seconds,
            "lft_soft_use_expires_seconds": 0,
            "lft_hard_use_expires_seconds": 0,
        }


@dataclass(frozen=True)
class Algorithm:
    """A Linux crypto algorithm name with its key; `bits` is the ICV/truncation length."""

    name: str
    key: bytes = field(repr=False)
    bits: int = 0

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) >= ALG_NAME_SIZE:
            raise ValueError("algorithm name must be 1 to 63 octets")


@dataclass(frozen=True)
class Encap:
    """UDP encapsulation (NAT-T, RFC 3948) with the SA's source and destination ports."""

    sport: int
    dport: int

    def __post_init__(self) -> None:
        for port in (self.sport, self.dport):
            if not 0 < port <= 0xFFFF:
                raise ValueError("encapsulation ports must be 1-65535")


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int = 0xFFFFFFFF


@dataclass(frozen=True)
class SaSpec:
    """One XFRM state. Exactly one of `aead` or `crypt` (+ optional `auth`)."""

    src: str
    dst: str
    spi: int
    reqid: int
    mode: str = "tunnel"
    protocol: str = "esp"
    aead: Algorithm | None = None
    crypt: Algorithm | None = None
    auth: Algorithm | None = None
    esn: bool = False
    replay_window: int = 0
    encap: Encap | None = None
    lifetime: Lifetime = field(default_factory=Lifetime)
    mark: Mark | None = None
    if_id: int = 0
    selector: Selector | None = None

    def __post_init__(self) -> None:
        src, dst = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        if src.version != dst.version:
            raise ValueError("SA source and destination are of different families")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if not 0 < self.spi <= 0xFFFFFFFF:
            raise ValueError("spi must be 1-4294967295")
        if not 0 <= self.reqid <= 0xFFFFFFFF or not 0 <= self.if_id <= 0xFFFFFFFF:
            raise ValueError("reqid and if_id must fit in 32 bits")
        if (self.aead is None) == (self.crypt is None):
            raise ValueError("an SA takes exactly one of aead or crypt")
        if self.aead is not None and self.auth is not None:
            raise ValueError("an AEAD SA takes no separate auth algorithm")
        if not 0 <= self.replay_window <= MAX_REPLAY_WINDOW:
            raise ValueError(f"replay_window must be 0-{MAX_REPLAY_WINDOW}")
        if self.esn and self.replay_window == 0:
            raise ValueError("ESN needs a replay window (RFC 4303 2.2.1)")

    @property
    def family(self) -> int:
        return _family(ipaddress.ip_address(self.src))


@dataclass(frozen=True)
class Template:
    """The SA a policy requires (struct xfrm_user_tmpl)."""

    src: str
    dst: str
    reqid: int
    mode: str = "tunnel"
    protocol: str = "esp"
    spi: int = 0
    optional: bool = False

    def pack(self) -> bytes:
        src, dst = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        if src.version != dst.version:
            raise ValueError("template source and destination are of different families")
        return USER_TMPL_FORMAT.pack(
            _packed(dst),
            self.spi.to_bytes(4, "big"),
            PROTOCOLS[self.protocol],
            _family(src),
            _packed(src),
            self.reqid,
            MODES[self.mode],
            0,  # share: XFRM_SHARE_ANY
            int(self.optional),
            0xFFFFFFFF,  # aalgos: any
            0xFFFFFFFF,  # ealgos: any
            0xFFFFFFFF,  # calgos: any
        )


@dataclass(frozen=True)
class Migration:
    """One template (and the SA it names) moving to new endpoints (struct xfrm_user_migrate):
    `old_src` -> `old_dst` becomes `new_src` -> `new_dst` (MOBIKE, RFC 4555)."""

    old_src: str
    old_dst: str
    new_src: str
    new_dst: str
    reqid: int
    mode: str = "tunnel"
    protocol: str = "esp"

    def pack(self) -> bytes:
        old_src, old_dst = ipaddress.ip_address(self.old_src), ipaddress.ip_address(self.old_dst)
        new_src, new_dst = ipaddress.ip_address(self.new_src), ipaddress.ip_address(self.new_dst)
        if old_src.version != old_dst.version or new_src.version != new_dst.version:
            raise ValueError("migration source and destination are of different families")
        return USER_MIGRATE_FORMAT.pack(
            _packed(old_dst),
            _packed(old_src),
            _packed(new_dst),
            _packed(new_src),
            PROTOCOLS[self.protocol],
            MODES[self.mode],
            0,
            self.reqid,
            _family(old_src),
            _family(new_src),
        )


@dataclass(frozen=True)
class PolicySpec:
    """One XFRM policy: selector, direction, priority, action and its SA templates."""

    selector: Selector
    direction: str
    priority: int = 0
    templates: tuple[Template, ...] = ()
    block: bool = False
    mark: Mark | None = None
    if_id: int = 0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
        if not 0 <= self.priority <= 0xFFFFFFFF:
            raise ValueError("priority must fit in 32 bits")


# -- encoding -----------------------------------------------------------------------------------


def _algo(alg: Algorithm, extra: int | None) -> bytes:
    name = alg.name.encode()
    bits = len(alg.key) * 8
    head = (
        ALGO_FORMAT.pack(name, bits) if extra is None else ALGO_EXT_FORMAT.pack(name, bits, extra)
    )
    return head + alg.key


def _replay_esn(window: int) -> bytes:
    """struct xfrm_replay_state_esn announcing ceil(window / 32) bitmap words, without them.

    The kernel takes the bare head (it allocates the zeroed bitmap itself) and
    iproute2 sends exactly this; a new SA has no replay state to carry.
    """
    bmp_len = (window + 31) // 32
    return REPLAY_ESN_FORMAT.pack(bmp_len, 0, 0, 0, 0, window)


def _mark_and_if_id(mark: Mark | None, if_id: int) -> list[list[Any]]:
    """XFRMA_MARK then XFRMA_IF_ID, each only when set (the order iproute2 uses)."""
    attrs: list[list[Any]] = []
    if mark is not None:
        attrs.append(["XFRMA_MARK", {"v": mark.value, "m": mark.mask}])
    if if_id:
        attrs.append(["XFRMA_IF_ID", if_id])
    return attrs


def _finish(msg: nlmsg, msg_type: int, flags: int, seq: int, pid: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = pid
    msg.encode()
    return bytes(msg.data)


def encode_sa(spec: SaSpec, *, update: bool = False, seq: int = 0, pid: int = 0) -> bytes:
    """XFRM_MSG_NEWSA (or UPDSA) for `spec`: the usersa_info, then the attributes.

    Attribute order: algorithms, encapsulation, replay state, mark, if_id (the
    order iproute2 uses, so requests compare byte for byte). A window above 32 or
    ESN takes `XFRMA_REPLAY_ESN_VAL`; a smaller one the legacy `replay_window`
    octet (0 = off).
    """
    src, dst = ipaddress.ip_address(spec.src), ipaddress.ip_address(spec.dst)
    msg = xfrm_usersa_info()
    body: dict[str, Any] = {name: 0 for name, _ in _USERSA_INFO_FIELDS if not name.startswith("__")}
    body.update({"sel_daddr": bytes(16), "sel_saddr": bytes(16)})
    if spec.selector is not None:
        body.update(spec.selector.fields("sel_"))
    body.update(
        {
            "id_daddr": _packed(dst),
            "id_spi": spec.spi,
            "id_proto": PROTOCOLS[spec.protocol],
            "saddr": _packed(src),
            "reqid": spec.reqid,
            "family": spec.family,
            "mode": MODES[spec.mode],
        }
    )
    body.update(spec.lifetime.fields())
    use_esn_attr = spec.esn or spec.replay_window > 32
    if not use_esn_attr:
        body["replay_window"] = spec.replay_window
    if spec.esn:
        body["flags"] = XFRM_STATE_ESN
    msg.update(body)
    attrs: list[list[Any]] = []
    if spec.aead is not None:
        attrs.append(["XFRMA_ALG_AEAD", _algo(spec.aead, spec.aead.bits)])
    else:
        assert spec.crypt is not None
        attrs.append(["XFRMA_ALG_CRYPT", _algo(spec.crypt, None)])
        if spec.auth is not None:
            attrs.append(["XFRMA_ALG_AUTH_TRUNC", _algo(spec.auth, spec.auth.bits)])
    if spec.encap is not None:
        attrs.append(
            [
                "XFRMA_ENCAP",
                {
                    "encap_type": UDP_ENCAP_ESPINUDP,
                    "encap_sport": spec.encap.sport,
                    "encap_dport": spec.encap.dport,
                    "encap_oa": bytes(16),
                },
            ]
        )
    if use_esn_attr:
        attrs.append(["XFRMA_REPLAY_ESN_VAL", _replay_esn(spec.replay_window)])
    msg["attrs"] = attrs + _mark_and_if_id(spec.mark, spec.if_id)
    msg_type = XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA
    return _finish(msg, msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, pid)


def _usersa_id(
    msg_type: int,
    flags: int,
    src: str | None,
    dst: str,
    spi: int,
    protocol: str,
    mark: Mark | None,
    seq: int,
    pid: int,
) -> bytes:
    address = ipaddress.ip_address(dst)
    msg = xfrm_usersa_id()
    msg.update(
        {
            "daddr": _packed(address),
            "spi": spi,
            "family": _family(address),
            "proto": PROTOCOLS[protocol],
        }
    )
    attrs: list[list[Any]] = []
    if src is not None:
        source = ipaddress.ip_address(src)
        if source.version != address.version:
            raise ValueError("SA source and destination are of different families")
        attrs.append(["XFRMA_SRCADDR", _packed(source)])
    msg["attrs"] = attrs + _mark_and_if_id(mark, 0)
    return _finish(msg, msg_type, flags, seq, pid)


def encode_sa_delete(
    src: str | None,
    dst: str,
    spi: int,
    protocol: str = "esp",
    *,
    mark: Mark | None = None,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """XFRM_MSG_DELSA of the SA (destination, SPI, protocol; source in XFRMA_SRCADDR)."""
    flags = NLM_F_REQUEST | NLM_F_ACK
    return _usersa_id(XFRM_MSG_DELSA, flags, src, dst, spi, protocol, mark, seq, pid)


def encode_sa_get(
    src: str | None,
    dst: str,
    spi: int,
    protocol: str = "esp",
    *,
    mark: Mark | None = None,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """XFRM_MSG_GETSA of one SA: the kernel answers with its usersa_info (counters in curlft)."""
    return _usersa_id(XFRM_MSG_GETSA, NLM_F_REQUEST, src, dst, spi, protocol, mark, seq, pid)


def encode_sa_dump(*, seq: int = 0, pid: int = 0) -> bytes:
    msg = xfrm_usersa_id()
    msg.update({"daddr": bytes(16), "spi": 0, "family": 0, "proto": 0})
    return _finish(msg, XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP, seq, pid)


def encode_policy(spec: PolicySpec, *, update: bool = False, seq: int = 0, pid: int = 0) -> bytes:
    """XFRM_MSG_NEWPOLICY (or UPDPOLICY): userpolicy_info, templates, mark, if_id."""
    msg = xfrm_userpolicy_info()
    body: dict[str, Any] = {n: 0 for n, _ in _USERPOLICY_INFO_FIELDS if not n.startswith("__")}
    body.update(spec.selector.fields("sel_"))
    body.update(Lifetime().fields())
    body.update(
        {
            "priority": spec.priority,
            "dir": DIRECTIONS[spec.direction],
            "action": XFRM_POLICY_BLOCK if spec.block else XFRM_POLICY_ALLOW,
        }
    )
    msg.update(body)
    attrs: list[list[Any]] = []
    if spec.templates:
        attrs.append(["XFRMA_TMPL", b"".join(t.pack() for t in spec.templates)])
    msg["attrs"] = attrs + _mark_and_if_id(spec.mark, spec.if_id)
    msg_type = XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY
    return _finish(msg, msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, pid)


def encode_policy_delete(
    selector: Selector,
    direction: str,
    *,
    mark: Mark | None = None,
    if_id: int = 0,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """XFRM_MSG_DELPOLICY by selector and direction."""
    msg = xfrm_userpolicy_id()
    body = selector.fields("sel_")
    body.update({"index": 0, "dir": DIRECTIONS[direction]})
    msg.update(body)
    msg["attrs"] = _mark_and_if_id(mark, if_id)
    return _finish(msg, XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, pid)


def encode_migrate(
    selector: Selector,
    direction: str,
    migrations: Sequence[Migration],
    *,
    encap: Encap | None = None,
    if_id: int = 0,
    seq: int = 0,
    pid: int = 0,
) -> bytes:
    """XFRM_MSG_MIGRATE: the policy (selector, direction) and the SAs its templates name move
    to new endpoints, keys and replay state kept by the kernel; `encap` is the UDP
    encapsulation of the moved SA (the kernel keeps the old one when it is None)."""
    if not migrations:
        raise ValueError("a migration needs at least one template")
    msg = xfrm_userpolicy_id()
    body = selector.fields("sel_")
    body.update({"index": 0, "dir": DIRECTIONS[direction]})
    msg.update(body)
    attrs: list[list[Any]] = [["XFRMA_MIGRATE", b"".join(m.pack() for m in migrations)]]
    if encap is not None:
        attrs.append(
            [
                "XFRMA_ENCAP",
                {
                    "encap_type": UDP_ENCAP_ESPINUDP,
                    "encap_sport": encap.sport,
                    "encap_dport": encap.dport,
                    "encap_oa": bytes(16),
                },
            ]
        )
    msg["attrs"] = attrs + _mark_and_if_id(None, if_id)
    return _finish(msg, XFRM_MSG_MIGRATE, NLM_F_REQUEST | NLM_F_ACK, seq, pid)


def encode_spdinfo(
    ipv4: tuple[int, int] | None, ipv6: tuple[int, int] | None, *, seq: int = 0, pid: int = 0
) -> bytes:
    """XFRM_MSG_NEWSPDINFO setting the SPD hash thresholds: (local bits, remote bits) per family.

    Policies whose selectors are at least this specific go to the hash table,
    the others to the ordered list (`sp-hash-ipv4`/`sp-hash-ipv6`).
    """
    attrs: list[list[Any]] = []
    for name, value, top in (
        ("XFRMA_SPD_IPV4_HTHRESH", ipv4, 32),
        ("XFRMA_SPD_IPV6_HTHRESH", ipv6, 128),
    ):
        if value is None:
            continue
        local, remote = value
        if not (0 <= local <= top and 0 <= remote <= top):
            raise ValueError(f"{name} bits must be 0-{top}")
        attrs.append([name, {"lbits": local, "rbits": remote}])
    msg = xfrm_spdinfo()
    msg["flags"] = 0xFFFFFFFF  # unused by the kernel; iproute2 sends all ones
    msg["attrs"] = attrs
    return _finish(msg, XFRM_MSG_NEWSPDINFO, NLM_F_REQUEST | NLM_F_ACK, seq, pid)


def encode_spdinfo_get(*, seq: int = 0, pid: int = 0) -> bytes:
    msg = xfrm_spdinfo()
    msg["flags"] = 0xFFFFFFFF
    msg["attrs"] = []
    return _finish(msg, XFRM_MSG_GETSPDINFO, NLM_F_REQUEST, seq, pid)


# -- decoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaInfo:
    """An SA as the kernel reports it (dump, GETSA answer, EXPIRE): no key material."""

    src: str
    dst: str
    spi: int
    protocol: int
    reqid: int
    mode: int
    family: int
    flags: int
    replay_window: int
    bytes: int
    packets: int
    add_time: int
    use_time: int
    soft_seconds: int
    hard_seconds: int
    soft_bytes: int
    hard_bytes: int
    soft_packets: int
    hard_packets: int
    algorithms: tuple[str, ...]
    encap: tuple[int, int] | None
    if_id: int
    esn_window: int | None


@dataclass(frozen=True)
class Acquire:
    """The kernel wants an SA for traffic matching a (trap) policy."""

    src: str
    dst: str
    protocol: int
    reqid: int
    selector_src: str
    selector_dst: str
    policy_index: int
    policy_dir: int
    seq: int


@dataclass(frozen=True)
class Expire:
    sa: SaInfo
    hard: bool


@dataclass(frozen=True)
class SpdInfo:
    ipv4: tuple[int, int] | None
    ipv6: tuple[int, int] | None


@dataclass(frozen=True)
class Ack:
    """NLMSG_ERROR: 0 = success, else a negative errno, with the extack text if any."""

    error: int
    extack: str
    seq: int


@dataclass(frozen=True)
class Other:
    """A well-formed netlink message this module has no use for (its type only)."""

    msg_type: int


Message = SaInfo | Acquire | Expire | SpdInfo | Ack | Other

# minimum payload of each attribute a decoded message reads
_ATTR_MIN = {
    XFRMA_ALG_AUTH: ALGO_FORMAT.size,
    XFRMA_ALG_CRYPT: ALGO_FORMAT.size,
    XFRMA_ALG_AEAD: ALGO_EXT_FORMAT.size,
    XFRMA_ALG_AUTH_TRUNC: ALGO_EXT_FORMAT.size,
    XFRMA_ENCAP: ENCAP_SIZE,
    XFRMA_TMPL: 0,
    XFRMA_LTIME_VAL: LIFETIME_CUR_SIZE,
    XFRMA_LASTUSED: 8,
    XFRMA_MARK: MARK_SIZE,
    XFRMA_TFCPAD: 4,
    XFRMA_REPLAY_ESN_VAL: REPLAY_ESN_FORMAT.size,
    XFRMA_SA_EXTRA_FLAGS: 4,
    XFRMA_SET_MARK: 4,
    XFRMA_SET_MARK_MASK: 4,
    XFRMA_IF_ID: 4,
    XFRMA_POLICY_TYPE: 4,
}
_SPD_ATTR_MIN = {XFRMA_SPD_IPV4_HTHRESH: 2, XFRMA_SPD_IPV6_HTHRESH: 2}


def _walk_attrs(data: bytes, start: int, end: int, minimum: dict[int, int]) -> dict[int, bytes]:
    """Attribute payloads by type between start and end; every length checked."""
    attrs: dict[int, bytes] = {}
    offset = start
    while offset + NLA_HDRLEN <= end:
        length, nla_type = struct.unpack_from("=HH", data, offset)
        if length < NLA_HDRLEN or offset + length > end:
            raise XfrmDecodeError(f"attribute at {offset} has a bad length {length}")
        nla_type &= 0x3FFF
        payload = data[offset + NLA_HDRLEN : offset + length]
        if len(payload) < minimum.get(nla_type, 0):
            raise XfrmDecodeError(f"attribute {nla_type} is {len(payload)} octets, too short")
        attrs.setdefault(nla_type, payload)
        offset += (length + 3) & ~3
    return attrs


def _check_attr_contents(attrs: dict[int, bytes]) -> None:
    """Variable-length payloads: the key and the replay bitmap fit in their attribute."""
    for kind in (XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ALG_AEAD, XFRMA_ALG_AUTH_TRUNC):
        payload = attrs.get(kind)
        if payload is None:
            continue
        head = (
            ALGO_FORMAT.size if kind in (XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT) else ALGO_EXT_FORMAT.size
        )
        key_bits = struct.unpack_from("=I", payload, ALG_NAME_SIZE)[0]
        if head + (key_bits + 7) // 8 > len(payload):
            raise XfrmDecodeError(f"attribute {kind} announces a key longer than itself")
    payload = attrs.get(XFRMA_REPLAY_ESN_VAL)
    if payload is not None:
        bmp_len = struct.unpack_from("=I", payload)[0]
        bare = len(payload) == REPLAY_ESN_FORMAT.size  # the head alone, as iproute2 sends it
        if not bare and REPLAY_ESN_FORMAT.size + 4 * bmp_len > len(payload):
            raise XfrmDecodeError("replay state announces a bitmap longer than itself")


def _address(raw: bytes, family: int) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    raise XfrmDecodeError(f"unknown address family {family}")


def _prefix(raw: bytes, family: int, length: int) -> str:
    top = 32 if family == socket.AF_INET else 128
    if length > top:
        raise XfrmDecodeError(f"prefix length {length} out of range")
    network = ipaddress.ip_network(f"{_address(raw, family)}/{length}", strict=False)
    return str(network)


def _alg_name(payload: bytes) -> str:
    return payload[:ALG_NAME_SIZE].split(b"\0", 1)[0].decode("ascii", "replace")


def _decode_body(cls: type[nlmsg], data: bytes, offset: int) -> nlmsg:
    msg = cls(bytearray(data), offset=offset)
    msg.decode()
    return msg


def _sa_info(msg: nlmsg, attrs: dict[int, bytes]) -> SaInfo:
    family = msg["family"]
    algorithms = tuple(
        _alg_name(attrs[kind])
        for kind in (XFRMA_ALG_AEAD, XFRMA_ALG_CRYPT, XFRMA_ALG_AUTH_TRUNC, XFRMA_ALG_AUTH)
        if kind in attrs
    )
    encap = None
    if XFRMA_ENCAP in attrs:
        sport, dport = struct.unpack_from(">HH", attrs[XFRMA_ENCAP], 2)
        encap = (sport, dport)
    esn_window = None
    if XFRMA_REPLAY_ESN_VAL in attrs:
        esn_window = struct.unpack_from("=I", attrs[XFRMA_REPLAY_ESN_VAL], 20)[0]
    return SaInfo(
        src=_address(msg["saddr"], family),
        dst=_address(msg["id_daddr"], family),
        spi=msg["id_spi"],
        protocol=msg["id_proto"],
        reqid=msg["reqid"],
        mode=msg["mode"],
        family=family,
        flags=msg["flags"],
        replay_window=msg["replay_window"],
        bytes=msg["cur_bytes"],
        packets=msg["cur_packets"],
        add_time=msg["cur_add_time"],
        use_time=msg["cur_use_time"],
        soft_seconds=msg["lft_soft_add_expires_seconds"],
        hard_seconds=msg["lft_hard_add_expires_seconds"],
        soft_bytes=msg["lft_soft_byte_limit"],
        hard_bytes=msg["lft_hard_byte_limit"],
        soft_packets=msg["lft_soft_packet_limit"],
        hard_packets=msg["lft_hard_packet_limit"],
        algorithms=algorithms,
        encap=encap,
        if_id=struct.unpack_from("=I", attrs[XFRMA_IF_ID])[0] if XFRMA_IF_ID in attrs else 0,
        esn_window=esn_window,
    )


def _parse_one(data: bytes, offset: int, length: int, msg_type: int, seq: int) -> Message:
    end = offset + length
    body = offset + NLMSG_HDRLEN
    if msg_type == NLMSG_ERROR:
        if length < NLMSG_HDRLEN + 4 + NLMSG_HDRLEN:
            raise XfrmDecodeError("netlink error message too short")
        err = nlmsgerr(bytearray(data[offset:end]))
        err.decode()
        code = err["error"]
        flags = struct.unpack_from("=H", data, offset + 6)[0]
        extack = ""
        if flags & NLM_F_ACK_TLVS:
            # the request is echoed whole, or only its header when the kernel capped it
            inner_len = struct.unpack_from("=I", data, body + 4)[0]
            capped = bool(flags & NLM_F_CAPPED) or inner_len > length - NLMSG_HDRLEN - 4
            start = body + 4 + (NLMSG_HDRLEN if capped else ((inner_len + 3) & ~3))
            tlvs = _walk_attrs(data, start, end, {}) if start <= end else {}
            text = tlvs.get(NLMSGERR_ATTR_MSG, b"")
            extack = text.split(b"\0", 1)[0].decode("utf-8", "replace")
        return Ack(error=-code, extack=extack, seq=seq)
    spec = BODY_CLASSES.get(msg_type)
    if spec is None:
        return Other(msg_type)
    cls, size = spec
    if length < NLMSG_HDRLEN + size:
        raise XfrmDecodeError(f"{MESSAGE_NAMES.get(msg_type, msg_type)} body too short")
    attrs_start = body + size
    if msg_type in (XFRM_MSG_NEWSPDINFO, XFRM_MSG_GETSPDINFO):
        attrs = _walk_attrs(data, attrs_start, end, _SPD_ATTR_MIN)

        def thresh(kind: int, top: int) -> tuple[int, int] | None:
            if kind not in attrs:
                return None
            lbits, rbits = attrs[kind][0], attrs[kind][1]
            if lbits > top or rbits > top:
                raise XfrmDecodeError("hash threshold out of range")
            return (lbits, rbits)

        return SpdInfo(thresh(XFRMA_SPD_IPV4_HTHRESH, 32), thresh(XFRMA_SPD_IPV6_HTHRESH, 128))
    attrs = _walk_attrs(data, attrs_start, end, _ATTR_MIN)
    _check_attr_contents(attrs)
    msg = _decode_body(cls, data[offset:end], 0)
    if msg_type in (XFRM_MSG_NEWSA, XFRM_MSG_UPDSA):
        return _sa_info(msg, attrs)
    if msg_type == XFRM_MSG_EXPIRE:
        if msg["hard"] > 1:
            raise XfrmDecodeError("expire hard flag is neither 0 nor 1")
        return Expire(sa=_sa_info(msg, attrs), hard=bool(msg["hard"]))
    if msg_type == XFRM_MSG_ACQUIRE:
        family = msg["sel_family"]
        tmpl_family = family
        if XFRMA_TMPL in attrs and len(attrs[XFRMA_TMPL]) >= USER_TMPL_FORMAT.size:
            tmpl = USER_TMPL_FORMAT.unpack_from(attrs[XFRMA_TMPL])
            reqid, tmpl_family = tmpl[5], tmpl[3]
        else:
            reqid = 0
        return Acquire(
            src=_address(msg["saddr"], tmpl_family),
            dst=_address(msg["id_daddr"], tmpl_family),
            protocol=msg["id_proto"],
            reqid=reqid,
            selector_src=_prefix(msg["sel_saddr"], family, msg["sel_prefixlen_s"]),
            selector_dst=_prefix(msg["sel_daddr"], family, msg["sel_prefixlen_d"]),
            policy_index=msg["policy_index"],
            policy_dir=msg["policy_dir"],
            seq=msg["seq"],
        )
    return Other(msg_type)


def parse_messages(data: bytes) -> Iterator[tuple[int, Message]]:
    """(sequence number, message) for each netlink message in one datagram.

    Raises XfrmDecodeError for bytes that are not a well-formed XFRM message:
    lengths are checked here before any field is read.
    """
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HDRLEN:
            raise XfrmDecodeError("truncated netlink header")
        length, msg_type, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < NLMSG_HDRLEN or offset + length > len(data):
            raise XfrmDecodeError(f"netlink length {length} does not fit the datagram")
        if msg_type != NLMSG_DONE:
            try:
                message = _parse_one(data, offset, length, msg_type, seq)
            except XfrmDecodeError:
                raise
            except (struct.error, ValueError, IndexError, KeyError, TypeError) as exc:
                raise XfrmDecodeError(f"malformed {msg_type:#x} message: {exc}") from None
            yield seq, message
        else:
            yield seq, Other(NLMSG_DONE)
        offset += (length + 3) & ~3


# -- the socket ---------------------------------------------------------------------------------


def open_socket(netns: str | None = None, groups: Sequence[int] = ()) -> socket.socket:
    """A NETLINK_XFRM socket (in network namespace `netns` if named) joined to `groups`."""
    from pyroute2.netns import create_socket

    sock = create_socket(
        netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=NETLINK_XFRM
    )
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


class XfrmSocket:
    """Request/acknowledge over one NETLINK_XFRM socket (the kernel answers synchronously)."""

    def __init__(self, netns: str | None = None, timeout: float = 5.0) -> None:
        self.sock = open_socket(netns)
        self.timeout = timeout
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XfrmSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _recv(self) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], self.timeout)
        if not ready:
            raise TimeoutError("no answer from the kernel on the XFRM socket")
        return self.sock.recv(1 << 16)

    def transact(self, build: Any, request: str, *, single: bool = False) -> list[Message]:
        """Send build(seq=...) and collect the answers up to the ack or the end of a dump
        (or the first answer when `single`: a GET without NLM_F_ACK).

        Raises XfrmError when the kernel refuses the request.
        """
        seq = self.next_seq()
        self.sock.send(build(seq=seq))
        answers: list[Message] = []
        while True:
            for got_seq, message in parse_messages(self._recv()):
                if got_seq != seq:
                    continue
                if isinstance(message, Ack):
                    if message.error:
                        raise XfrmError(message.error, request, message.extack)
                    return answers
                if isinstance(message, Other) and message.msg_type == NLMSG_DONE:
                    return answers
                answers.append(message)
                if single and not isinstance(message, Other):
                    return answers

    # convenience requests -----------------------------------------------------------------
    def add_sa(self, spec: SaSpec, *, update: bool = False) -> None:
        name = "XFRM_MSG_UPDSA" if update else "XFRM_MSG_NEWSA"
        self.transact(lambda seq: encode_sa(spec, update=update, seq=seq), name)

    def delete_sa(
        self, src: str | None, dst: str, spi: int, protocol: str = "esp", mark: Mark | None = None
    ) -> None:
        self.transact(
            lambda seq: encode_sa_delete(src, dst, spi, protocol, mark=mark, seq=seq),
            "XFRM_MSG_DELSA",
        )

    def get_sa(
        self, src: str | None, dst: str, spi: int, protocol: str = "esp", mark: Mark | None = None
    ) -> SaInfo:
        def get_one(seq: int) -> bytes:
            return encode_sa_get(src, dst, spi, protocol, mark=mark, seq=seq)

        for message in self.transact(get_one, "XFRM_MSG_GETSA", single=True):
            if isinstance(message, SaInfo):
                return message
        raise XfrmError(errno.ENOENT, "XFRM_MSG_GETSA")

    def dump_sas(self) -> list[SaInfo]:
        answers = self.transact(lambda seq: encode_sa_dump(seq=seq), "XFRM_MSG_GETSA dump")
        return [m for m in answers if isinstance(m, SaInfo)]

    def add_policy(self, spec: PolicySpec, *, update: bool = False) -> None:
        name = "XFRM_MSG_UPDPOLICY" if update else "XFRM_MSG_NEWPOLICY"
        self.transact(lambda seq: encode_policy(spec, update=update, seq=seq), name)

    def delete_policy(
        self, selector: Selector, direction: str, mark: Mark | None = None, if_id: int = 0
    ) -> None:
        self.transact(
            lambda seq: encode_policy_delete(selector, direction, mark=mark, if_id=if_id, seq=seq),
            "XFRM_MSG_DELPOLICY",
        )

    def migrate(
        self,
        selector: Selector,
        direction: str,
        migrations: Sequence[Migration],
        *,
        encap: Encap | None = None,
        if_id: int = 0,
    ) -> None:
        self.transact(
            lambda seq: encode_migrate(
                selector, direction, migrations, encap=encap, if_id=if_id, seq=seq
            ),
            "XFRM_MSG_MIGRATE",
        )

    def set_spd_hash(self, ipv4: tuple[int, int] | None, ipv6: tuple[int, int] | None) -> None:
        self.transact(lambda seq: encode_spdinfo(ipv4, ipv6, seq=seq), "XFRM_MSG_NEWSPDINFO")

    def get_spdinfo(self) -> SpdInfo:
        def get_one(seq: int) -> bytes:
            return encode_spdinfo_get(seq=seq)

        for message in self.transact(get_one, "XFRM_MSG_GETSPDINFO", single=True):
            if isinstance(message, SpdInfo):
                return message
        raise XfrmError(errno.ENOENT, "XFRM_MSG_GETSPDINFO")


class XfrmEvents:
    """A NETLINK_XFRM socket joined to the ACQUIRE and EXPIRE groups, read without blocking."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_socket(netns, groups=(XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE))
        self.sock.setblocking(False)
        self.malformed = 0
        self.overruns = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self) -> list[Acquire | Expire]:
        """The events waiting on the socket; a malformed datagram is counted and skipped."""
        events: list[Acquire | Expire] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1  # the kernel dropped events for us: read on
                continue
            try:
                for _seq, message in parse_messages(data):
                    if isinstance(message, (Acquire, Expire)):
                        events.append(message)
            except XfrmDecodeError:
                self.malformed += 1
