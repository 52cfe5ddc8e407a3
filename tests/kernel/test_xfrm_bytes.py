"""Our XFRM requests, byte for byte against what iproute2 sends for the same SA or policy.

iproute2's `ip xfrm` is the reference encoder: each case runs the `ip` command in
a namespace under strace, takes the request it wrote to its netlink socket and
compares it with `services/kernel/xfrm.py`'s encoding, sequence number and port
id aside. The kernel refuses the ESP states here (no `CONFIG_INET_ESP`), which
does not matter: the request is captured before the answer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ikefarm.services.kernel import xfrm
from ikefarm.services.kernel.netlink import NetlinkKernel, NetlinkOptions, PolicyOptions
from tests.harness.netns import Namespace
from tests.kernel.capture import netlink_requests, without_seq_and_pid
from tests.xfrm_helpers import GCM, sa_spec

pytestmark = pytest.mark.kernel

KEY16 = bytes(range(0x10, 0x20))
KEY32 = bytes(range(0x20, 0x40))
IP_GCM = ["aead", "rfc4106(gcm(aes))", "0x" + GCM.key.hex(), "128"]
IP_STATE = ["ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp"]
IP_SA = [*IP_STATE, "spi", "0xc0ffee01", "reqid", "7", "mode", "tunnel"]
_sa = sa_spec  # 192.0.2.1 -> 192.0.2.2, SPI 0xc0ffee01, reqid 7, AES-GCM-128 with salt


CBC_HMAC = {
    "aead": None,
    "crypt": xfrm.Algorithm("cbc(aes)", KEY16),
    "auth": xfrm.Algorithm("hmac(sha256)", KEY32, 128),
}
SELECTOR = xfrm.Selector("10.1.0.0/24", "10.2.0.0/16")
TEMPLATE = xfrm.Template("192.0.2.1", "192.0.2.2", reqid=7)

CASES: dict[str, tuple[list[str], Callable[[], bytes]]] = {
    "aead-gcm": ([*IP_SA, *IP_GCM], lambda: xfrm.encode_sa(_sa())),
    "cbc-hmac": (
        [*IP_SA, "enc", "cbc(aes)", "0x" + KEY16.hex(),
         "auth-trunc", "hmac(sha256)", "0x" + KEY32.hex(), "128"],
        lambda: xfrm.encode_sa(_sa(**CBC_HMAC)),
    ),
    "esn-window-4096": (
        [*IP_SA, *IP_GCM, "replay-window", "4096", "flag", "esn"],
        lambda: xfrm.encode_sa(_sa(esn=True, replay_window=4096)),
    ),
    "window-32-no-esn": (
        [*IP_SA, *IP_GCM, "replay-window", "32"],
        lambda: xfrm.encode_sa(_sa(replay_window=32)),
    ),
    "natt-encap": (
        [*IP_SA, *IP_GCM, "encap", "espinudp", "4500", "31337", "0.0.0.0"],
        lambda: xfrm.encode_sa(_sa(encap=xfrm.Encap(4500, 31337))),
    ),
    "lifetimes": (
        [*IP_SA, *IP_GCM, "limit", "time-soft", "3240", "limit", "time-hard", "3600",
         "limit", "byte-soft", "900000", "limit", "byte-hard", "1000000",
         "limit", "packet-soft", "9000", "limit", "packet-hard", "10000"],
        lambda: xfrm.encode_sa(
            _sa(lifetime=xfrm.Lifetime(900000, 1000000, 9000, 10000, 3240, 3600))
        ),
    ),
    "if-id": ([*IP_SA, *IP_GCM, "if_id", "42"], lambda: xfrm.encode_sa(_sa(if_id=42))),
    "mark": (
        [*IP_SA, *IP_GCM, "mark", "0x10", "mask", "0xf0"],
        lambda: xfrm.encode_sa(_sa(mark=xfrm.Mark(0x10, 0xF0))),
    ),
    "everything-cbc": (
        [*IP_SA, "enc", "cbc(aes)", "0x" + KEY16.hex(),
         "auth-trunc", "hmac(sha256)", "0x" + KEY32.hex(), "128",
         "encap", "espinudp", "4500", "4501", "0.0.0.0", "mark", "3", "mask", "0xff",
         "replay-window", "1024", "flag", "esn", "if_id", "9",
         "limit", "time-soft", "10", "limit", "time-hard", "20"],
        lambda: xfrm.encode_sa(
            _sa(**CBC_HMAC, encap=xfrm.Encap(4500, 4501), mark=xfrm.Mark(3, 0xFF), esn=True,
                replay_window=1024, if_id=9,
                lifetime=xfrm.Lifetime(soft_seconds=10, hard_seconds=20))
        ),
    ),
    "update-ipv6-transport": (
        ["ip", "xfrm", "state", "update", "src", "2001:db8::1", "dst", "2001:db8::2",
         "proto", "esp", "spi", "0x1000", "reqid", "3", "mode", "transport", *IP_GCM],
        lambda: xfrm.encode_sa(
            _sa(src="2001:db8::1", dst="2001:db8::2", spi=0x1000, reqid=3, mode="transport"),
            update=True,
        ),
    ),
    "transport-with-selector": (
        ["ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
         "spi", "0xc0ffee01", "reqid", "7", "mode", "transport", *IP_GCM,
         "sel", "src", "192.0.2.1/32", "dst", "192.0.2.2/32", "proto", "udp", "dport", "53"],
        lambda: xfrm.encode_sa(
            _sa(mode="transport",
                selector=xfrm.Selector("192.0.2.1/32", "192.0.2.2/32", proto=17, dport=53))
        ),
    ),
    "chacha20-poly1305-ipv6-natt": (
        ["ip", "xfrm", "state", "add", "src", "2001:db8::1", "dst", "2001:db8::2",
         "proto", "esp", "spi", "0x2000", "reqid", "9", "mode", "tunnel",
         "aead", "rfc7539esp(chacha20,poly1305)", "0x" + bytes(range(36)).hex(), "128",
         "encap", "espinudp", "4500", "4500", "::"],
        lambda: xfrm.encode_sa(
            _sa(src="2001:db8::1", dst="2001:db8::2", spi=0x2000, reqid=9,
                aead=xfrm.Algorithm("rfc7539esp(chacha20,poly1305)", bytes(range(36)), 128),
                encap=xfrm.Encap(4500, 4500))
        ),
    ),
    "delete": (
        ["ip", "xfrm", "state", "delete", "src", "192.0.2.1", "dst", "192.0.2.2",
         "proto", "esp", "spi", "0xc0ffee01"],
        lambda: xfrm.encode_sa_delete("192.0.2.1", "192.0.2.2", 0xC0FFEE01),
    ),
    "get-counters": (
        ["ip", "xfrm", "state", "get", "src", "192.0.2.1", "dst", "192.0.2.2",
         "proto", "esp", "spi", "0xc0ffee01"],
        lambda: xfrm.encode_sa_get("192.0.2.1", "192.0.2.2", 0xC0FFEE01),
    ),
    "policy-out": (
        ["ip", "xfrm", "policy", "add", "src", "10.1.0.0/24", "dst", "10.2.0.0/16",
         "dir", "out", "priority", "2000", "tmpl", "src", "192.0.2.1", "dst", "192.0.2.2",
         "proto", "esp", "reqid", "7", "mode", "tunnel"],
        lambda: xfrm.encode_policy(xfrm.PolicySpec(SELECTOR, "out", 2000, (TEMPLATE,))),
    ),
    "policy-fwd-port-ifid-mark": (
        ["ip", "xfrm", "policy", "update", "src", "10.1.0.0/24", "dst", "10.2.0.0/16",
         "proto", "tcp", "dport", "443", "dir", "fwd", "if_id", "5", "mark", "1", "mask", "3",
         "tmpl", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "reqid", "7",
         "mode", "tunnel"],
        lambda: xfrm.encode_policy(
            xfrm.PolicySpec(xfrm.Selector("10.1.0.0/24", "10.2.0.0/16", proto=6, dport=443),
                            "fwd", 0, (TEMPLATE,), mark=xfrm.Mark(1, 3), if_id=5),
            update=True,
        ),
    ),
    "policy-delete": (
        ["ip", "xfrm", "policy", "delete", "src", "10.1.0.0/24", "dst", "10.2.0.0/16",
         "dir", "in"],
        lambda: xfrm.encode_policy_delete(SELECTOR, "in"),
    ),
    "spd-hash-thresholds": (
        ["ip", "xfrm", "policy", "set", "hthresh4", "24", "16", "hthresh6", "64", "56"],
        lambda: xfrm.encode_spdinfo((24, 16), (64, 56)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_request_matches_iproute2(case: str, netns: Namespace, strace: str) -> None:
    argv, ours = CASES[case]
    sent = netlink_requests(netns.name, argv)
    assert sent, f"strace captured no netlink request from {' '.join(argv)}"
    theirs = without_seq_and_pid(sent[-1])
    mine = ours()
    assert mine[8:16] == bytes(8)  # the encoder was given seq 0 and pid 0
    assert mine.hex(" ") == theirs.hex(" ")


def test_sequence_and_port_id_are_placed_in_the_header() -> None:
    request = xfrm.encode_sa(_sa(), seq=0x01020304, pid=0x0A0B0C0D)
    assert request[8:12] == (0x01020304).to_bytes(4, "little")
    assert request[12:16] == (0x0A0B0C0D).to_bytes(4, "little")
    assert without_seq_and_pid(request) == xfrm.encode_sa(_sa())


async def test_child_install_sends_what_iproute2_sends(netns: Namespace, strace: str) -> None:
    """From a ChildInstall to the kernel request: the backend's inbound SA (AES-GCM-16,
    ESN with a 4096 window, NAT-T, rekey/life times, svti-id-in) is iproute2's, octet for octet.
    The SAD is the recording stand-in (this kernel holds no ESP state); the bytes are real."""
    from tests.kernel.test_netlink_backend import KEY_IN, EspStatesRecorded, child

    options = NetlinkOptions(
        policies={
            ("hq", "net"): PolicyOptions(
                svti_id_in=100, svti_id_out=101, rekey_time=3600, life_time=3960
            )
        }
    )
    backend = NetlinkKernel(options, netns=netns.name, socket=EspStatesRecorded(netns.name))
    try:
        await backend.install(child(replay_window=4096))
        inbound = backend.xfrm.states[("192.0.2.1", 0xC0000001)]  # type: ignore[attr-defined]
    finally:
        backend.close()
    argv = [
        "ip", "xfrm", "state", "add", "src", "198.51.100.2", "dst", "192.0.2.1",
        "proto", "esp", "spi", "0xc0000001", "reqid", "3", "mode", "tunnel",
        "aead", "rfc4106(gcm(aes))", "0x" + KEY_IN.hex(), "128",
        "encap", "espinudp", "4501", "4500", "0.0.0.0",
        "replay-window", "4096", "flag", "esn", "if_id", "100",
        "limit", "time-soft", "3600", "limit", "time-hard", "3960",
    ]  # fmt: skip
    sent = netlink_requests(netns.name, argv)
    assert xfrm.encode_sa(inbound).hex(" ") == without_seq_and_pid(sent[-1]).hex(" ")
