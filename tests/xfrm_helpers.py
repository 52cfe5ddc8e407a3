"""XFRM messages as the kernel sends them, for the decoder's unit and fuzz tests.

The SA bodies come from `encode_sa` (compared byte for byte with iproute2 in
tests/kernel/test_xfrm_bytes.py); ACQUIRE is laid out with the same pyroute2
class the decoder reads, filled as the kernel fills it (see the live ACQUIRE in
tests/kernel/test_xfrm_kernel.py).
"""

from __future__ import annotations

import socket
import struct

from ikefarm.services.kernel import xfrm

GCM = xfrm.Algorithm("rfc4106(gcm(aes))", bytes(range(20)), 128)


def sa_spec(**fields: object) -> xfrm.SaSpec:
    base: dict[str, object] = {
        "src": "192.0.2.1",
        "dst": "192.0.2.2",
        "spi": 0xC0FFEE01,
        "reqid": 7,
        "aead": GCM,
    }
    base.update(fields)
    return xfrm.SaSpec(**base)  # type: ignore[arg-type]


def _retype(request: bytes, msg_type: int, extra: bytes = b"", seq: int = 0) -> bytes:
    """`request` with another type/sequence, `extra` appended to its fixed body."""
    body_end = xfrm.NLMSG_HDRLEN + xfrm.USERSA_INFO_SIZE
    data = request[:body_end] + extra + request[body_end:]
    header = struct.pack("=IHHII", len(data), msg_type, 0, seq, 0)
    return header + data[xfrm.NLMSG_HDRLEN :]


def sa_dump_entry(spec: xfrm.SaSpec, seq: int = 1) -> bytes:
    """An SA of a GETSA dump (the kernel answers with XFRM_MSG_NEWSA)."""
    return _retype(xfrm.encode_sa(spec), xfrm.XFRM_MSG_NEWSA, seq=seq)


def expire(spec: xfrm.SaSpec, hard: bool) -> bytes:
    """XFRM_MSG_EXPIRE: the usersa_info, the hard flag padded to 8, then the attributes."""
    return _retype(xfrm.encode_sa(spec), xfrm.XFRM_MSG_EXPIRE, bytes([int(hard)]) + bytes(7))


def acquire(reqid: int = 7, seq: int = 0) -> bytes:
    msg = xfrm.xfrm_user_acquire()
    body = {n: 0 for n, _ in msg.fields if not n.startswith("__")}
    body.update(xfrm.Selector("10.1.0.1/32", "10.2.0.1/32").fields("sel_"))
    body.update(
        {
            "id_daddr": socket.inet_aton("192.0.2.2").ljust(16, b"\0"),
            "id_proto": xfrm.IPPROTO_ESP,
            "saddr": socket.inet_aton("192.0.2.1").ljust(16, b"\0"),
            "policy_sel_daddr": bytes(16),
            "policy_sel_saddr": bytes(16),
            "policy_dir": xfrm.XFRM_POLICY_OUT,
            "policy_index": 1,
            "seq": 99,
        }
    )
    msg.update(body)
    template = xfrm.Template("192.0.2.1", "192.0.2.2", reqid=reqid).pack()
    msg["attrs"] = [["XFRMA_TMPL", template]]
    msg["header"]["type"] = xfrm.XFRM_MSG_ACQUIRE
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def ack(error: int, seq: int, request: bytes, extack: str = "", *, whole: bool = False) -> bytes:
    """NLMSG_ERROR answering `request` (its header echoed, or all of it when `whole`), with
    an extack message if given."""
    flags = 0 if whole else xfrm.NLM_F_CAPPED
    tlvs = b""
    if extack:
        flags |= xfrm.NLM_F_ACK_TLVS
        text = extack.encode() + b"\0"
        tlvs = struct.pack("=HH", 4 + len(text), xfrm.NLMSGERR_ATTR_MSG) + text
        tlvs += bytes(-len(tlvs) % 4)
    echoed = request if whole else request[: xfrm.NLMSG_HDRLEN]
    body = struct.pack("=i", -error) + echoed + bytes(-len(echoed) % 4) + tlvs
    header = struct.pack("=IHHII", xfrm.NLMSG_HDRLEN + len(body), xfrm.NLMSG_ERROR, flags, seq, 0)
    return header + body
