"""Malformed netlink into the XFRM decoder (services/kernel/xfrm.py): a typed message or
XfrmDecodeError, never another exception, and never a key in what it returns; malformed
kernel event messages on the bus: typed or refused."""

from __future__ import annotations

import errno
import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import KernelAcquire, KernelExpire
from ikefarm.services.kernel import xfrm
from tests.xfrm_helpers import ack, acquire, expire, sa_dump_entry, sa_spec

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEY_MARK = bytes(range(20)).hex()

SEEDS = [
    sa_dump_entry(sa_spec(esn=True, replay_window=4096, encap=xfrm.Encap(4500, 4501), if_id=3)),
    sa_dump_entry(
        sa_spec(
            aead=None,
            crypt=xfrm.Algorithm("cbc(aes)", bytes(16)),
            auth=xfrm.Algorithm("hmac(sha256)", bytes(32), 128),
        )
    ),
    expire(sa_spec(), hard=False),
    expire(sa_spec(mark=xfrm.Mark(1, 1)), hard=True),
    acquire(),
    ack(errno.ENOSYS, 1, xfrm.encode_sa(sa_spec()), "Requested AEAD algorithm not found"),
    xfrm.encode_spdinfo((24, 16), (64, 56)),
]


def _decode(data: bytes) -> None:
    try:
        messages = list(xfrm.parse_messages(data))
    except xfrm.XfrmDecodeError:
        return
    for _seq, message in messages:
        assert isinstance(
            message, (xfrm.SaInfo, xfrm.Acquire, xfrm.Expire, xfrm.SpdInfo, xfrm.Ack, xfrm.Other)
        )
        assert KEY_MARK not in repr(message)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _decode(data)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8),
    st.integers(0, 700),
)
def test_mutated_kernel_messages(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    _decode(bytes(data[: max(cut, 0)] if cut < len(data) else data))


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.integers(0, 0xFFFF),
    st.integers(0, 0x3FFF),
    st.integers(xfrm.NLMSG_HDRLEN, 1200),
)
def test_lying_attribute_and_message_lengths(
    seed: bytes, nla_len: int, nla_type: int, msg_len: int
) -> None:
    data = bytearray(seed)
    spec = xfrm.BODY_CLASSES.get(struct.unpack_from("=H", data, 4)[0])
    if spec is not None and len(data) >= xfrm.NLMSG_HDRLEN + spec[1] + 4:
        struct.pack_into("=HH", data, xfrm.NLMSG_HDRLEN + spec[1], nla_len, nla_type)
    struct.pack_into("=I", data, 0, msg_len)
    _decode(bytes(data))


@FUZZ
@given(
    st.sampled_from([KernelAcquire, KernelExpire]),
    st.dictionaries(
        st.sampled_from(
            ["backend", "reqid", "hard", "spi", "src", "dst", "bytes", "local_ts", "unique_id"]
        ),
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        max_size=9,
    ),
)
def test_kernel_event_messages_decode_typed_or_refused(kind: type, body: dict) -> None:  # type: ignore[type-arg]
    raw = msgpack.packb({"v": 1, "kind": kind.KIND, "body": body})
    try:
        decoded = envelope.unpack(raw, kind)
    except BusError as exc:
        assert exc.code in {"bad_version", "bad_field", "missing_field", "bad_encoding"}
    else:
        assert isinstance(decoded.reqid, int) and isinstance(decoded.backend, str)
