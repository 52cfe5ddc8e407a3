"""The XFRM decoder (services/kernel/xfrm.py) on the messages the kernel sends."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from ikefarm.services.kernel import xfrm
from tests.xfrm_helpers import ack, acquire, expire, sa_dump_entry, sa_spec


def _one(data: bytes) -> xfrm.Message:
    messages = list(xfrm.parse_messages(data))
    assert len(messages) == 1
    return messages[0][1]


def test_dumped_sa_reads_back_without_keys() -> None:
    spec = sa_spec(
        esn=True,
        replay_window=4096,
        encap=xfrm.Encap(4500, 31337),
        if_id=9,
        lifetime=xfrm.Lifetime(soft_seconds=3240, hard_seconds=3600, hard_bytes=10**9),
    )
    sa = _one(sa_dump_entry(spec))
    assert isinstance(sa, xfrm.SaInfo)
    assert (sa.src, sa.dst, sa.spi, sa.reqid) == ("192.0.2.1", "192.0.2.2", 0xC0FFEE01, 7)
    assert sa.algorithms == ("rfc4106(gcm(aes))",)
    assert sa.encap == (4500, 31337)
    assert (sa.if_id, sa.esn_window, sa.flags) == (9, 4096, xfrm.XFRM_STATE_ESN)
    assert (sa.soft_seconds, sa.hard_seconds, sa.hard_bytes) == (3240, 3600, 10**9)
    assert sa.soft_bytes == xfrm.XFRM_INF
    assert "0001020304" not in repr(sa)


def test_cbc_hmac_sa_names_both_algorithms() -> None:
    spec = sa_spec(
        aead=None,
        crypt=xfrm.Algorithm("cbc(aes)", bytes(16)),
        auth=xfrm.Algorithm("hmac(sha256)", bytes(32), 128),
        replay_window=32,
    )
    sa = _one(sa_dump_entry(spec))
    assert isinstance(sa, xfrm.SaInfo)
    assert sa.algorithms == ("cbc(aes)", "hmac(sha256)")
    assert (sa.replay_window, sa.esn_window) == (32, None)


@pytest.mark.parametrize("hard", [False, True])
def test_expire_soft_and_hard(hard: bool) -> None:
    event = _one(expire(sa_spec(), hard))
    assert isinstance(event, xfrm.Expire)
    assert event.hard is hard
    assert event.sa.spi == 0xC0FFEE01


def test_acquire_names_the_template_and_the_packet_selector() -> None:
    event = _one(acquire(reqid=12))
    assert event == xfrm.Acquire(
        src="192.0.2.1",
        dst="192.0.2.2",
        protocol=xfrm.IPPROTO_ESP,
        reqid=12,
        selector_src="10.1.0.1/32",
        selector_dst="10.2.0.1/32",
        policy_index=1,
        policy_dir=xfrm.XFRM_POLICY_OUT,
        seq=99,
    )


def test_acks_carry_errno_and_extack_text() -> None:
    request = xfrm.encode_sa(sa_spec(), seq=5)
    ok = _one(ack(0, 5, request))
    assert ok == xfrm.Ack(error=0, extack="", seq=5)
    refused = _one(ack(errno.ENOSYS, 5, request, "Requested AEAD algorithm not found"))
    assert refused == xfrm.Ack(errno.ENOSYS, "Requested AEAD algorithm not found", 5)
    # without NLM_F_CAPPED the whole request comes back first, the text after it
    whole = _one(ack(errno.EINVAL, 5, request, "Invalid replay window", whole=True))
    assert whole == xfrm.Ack(errno.EINVAL, "Invalid replay window", 5)


def test_refusal_text_names_errno_and_request() -> None:
    error = xfrm.XfrmError(errno.EPROTONOSUPPORT, "XFRM_MSG_NEWSA", "Requested type not found")
    assert str(error) == (
        "kernel refused XFRM_MSG_NEWSA: Protocol not supported (EPROTONOSUPPORT): "
        "Requested type not found"
    )


def test_several_messages_in_one_datagram() -> None:
    data = sa_dump_entry(sa_spec(spi=1), seq=3) + sa_dump_entry(sa_spec(spi=2), seq=3)
    done = struct.pack("=IHHII", 20, xfrm.NLMSG_DONE, 0, 3, 0) + bytes(4)
    parsed = list(xfrm.parse_messages(data + done))
    assert [m.spi for _, m in parsed if isinstance(m, xfrm.SaInfo)] == [1, 2]
    assert parsed[-1][1] == xfrm.Other(xfrm.NLMSG_DONE)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:10], "truncated netlink header"),
        (lambda d: struct.pack("=I", len(d) + 4) + d[4:], "does not fit"),
        (lambda d: struct.pack("=I", 20) + d[4:20], "body too short"),
    ],
)
def test_malformed_lengths_are_refused(mangle: object, reason: str) -> None:
    data = mangle(sa_dump_entry(sa_spec()))  # type: ignore[operator]
    with pytest.raises(xfrm.XfrmDecodeError, match=reason):
        list(xfrm.parse_messages(data))


def test_attribute_announcing_a_longer_key_is_refused() -> None:
    data = bytearray(sa_dump_entry(sa_spec()))
    attr = xfrm.NLMSG_HDRLEN + xfrm.USERSA_INFO_SIZE
    struct.pack_into("=I", data, attr + 4 + xfrm.ALG_NAME_SIZE, 4096)  # key bits
    with pytest.raises(xfrm.XfrmDecodeError, match="key longer"):
        list(xfrm.parse_messages(bytes(data)))


def test_event_socket_counts_malformed_datagrams_and_keeps_reading() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    events = xfrm.XfrmEvents.__new__(xfrm.XfrmEvents)
    events.sock, events.malformed, events.overruns = ours, 0, 0
    ours.setblocking(False)
    try:
        kernel.send(b"\xff" * 7)
        kernel.send(acquire())
        kernel.send(expire(sa_spec(), hard=True)[:-9])
        got = events.read()
    finally:
        ours.close()
        kernel.close()
    assert [type(e) for e in got] == [xfrm.Acquire]
    assert events.malformed == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "beet"},
        {"spi": 0},
        {"dst": "2001:db8::1"},
        {"crypt": xfrm.Algorithm("cbc(aes)", bytes(16))},
        {"replay_window": 4097},
        {"esn": True, "replay_window": 0},
    ],
)
def test_impossible_specs_are_refused_before_encoding(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        sa_spec(**bad)


def test_event_socket_counts_kernel_overruns_and_reads_on() -> None:
    """ENOBUFS: the kernel dropped notifications for a slow reader; later ones still come."""

    class Overrun:
        def __init__(self) -> None:
            self.answers: list[bytes | OSError] = [
                OSError(errno.ENOBUFS, "No buffer space available"),
                acquire(),
            ]

        def recv(self, _size: int) -> bytes:
            if not self.answers:
                raise BlockingIOError
            answer = self.answers.pop(0)
            if isinstance(answer, OSError):
                raise answer
            return answer

    events = xfrm.XfrmEvents.__new__(xfrm.XfrmEvents)
    events.sock, events.malformed, events.overruns = Overrun(), 0, 0  # type: ignore[assignment]
    assert [type(e) for e in events.read()] == [xfrm.Acquire]
    assert events.overruns == 1
