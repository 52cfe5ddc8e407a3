"""The ingress sockets with the kernel holding the ESP SAs (docs/kernel-netlink.md, "The IKE
sockets"): `UDP_ENCAP` on the NAT-T socket, and the per-socket XFRM policy bypass that keeps
IKE out of any IPsec policy covering the peer, proven against block policies of the real
kernel in namespaces the test creates (gateway and peer on a veth pair; IPv4 loopback is
exempt from XFRM, so the peer is a real neighbour)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from ikefarm.services.kernel.backends import probe_esp
from tests.harness.netns import NetnsPair, make_pair

pytestmark = pytest.mark.kernel

IKE, NATT, PLAIN, PEER = 500, 4500, 4000, 5000
MARKER = "00000000"  # RFC 3948 non-ESP marker: what IKE on the NAT-T port starts with
ESP = "0000100100000001" + "00" * 8  # SPI 0x1001, sequence 1: ESP-in-UDP for the kernel

# runs inside the gateway namespace: opens the ingress sockets and a plain one there, the
# peer's socket in the peer namespace (setns), exchanges datagrams, prints what arrived
PROBE = f"""
import ctypes, errno, json, os, socket, sys
from ikefarm.services.ingress.sockets import open_udp_socket
local, remote, peer_netns = sys.argv[1:4]
family = socket.AF_INET6 if ":" in local else socket.AF_INET
def enter(path):
    fd = os.open(path, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + path)
    os.close(fd)
def bound(address, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((address, port))
    s.settimeout(1)
    return s
home = "/proc/self/ns/net"
home_fd = os.open(home, os.O_RDONLY)
enter(peer_netns)
peer = bound(remote, {PEER})
enter(f"/proc/self/fd/{{home_fd}}")
plain = bound(local, {PLAIN})
ike = open_udp_socket(local, {IKE}, require_bypass=True)
natt = open_udp_socket(local, {NATT}, kernel_esp=True, require_bypass=True)
for s in (ike, natt):
    s.settimeout(1)
out = {{"encap": {{"ike": ike.getsockopt(17, 100), "natt": natt.getsockopt(17, 100)}}}}
sent = {{}}
for name, s in (("ike", ike), ("natt", natt), ("plain", plain)):
    try:
        s.sendto(name.encode(), (remote, {PEER}))
        sent[name] = "sent"
    except OSError as exc:
        sent[name] = errno.errorcode[exc.errno]
out["sent"] = sent
def drain(s):
    got = []
    while True:
        try:
            got.append(s.recv(2048).hex())
        except (TimeoutError, socket.timeout):
            return got
out["peer_got"] = sorted(bytes.fromhex(d).decode() for d in drain(peer))
for port in ({IKE}, {NATT}, {PLAIN}):
    peer.sendto(bytes.fromhex("{MARKER}") + b"in", (local, port))
    peer.sendto(bytes.fromhex("{ESP}"), (local, port))
    peer.sendto(b"\\xff", (local, port))
out["got"] = {{n: drain(s) for n, s in (("ike", ike), ("natt", natt), ("plain", plain))}}
print(json.dumps(out))
"""


@pytest.fixture
def pair(_reaped_stale_namespaces: None) -> Iterator[NetnsPair]:
    with make_pair() as namespaces:
        yield namespaces


@pytest.mark.parametrize("version", [4, 6])
def test_bypass_and_udp_encap(pair: NetnsPair, version: int) -> None:
    local, remote = (pair.gw_v4, pair.peer_v4) if version == 4 else (pair.gw_v6, pair.peer_v6)
    prefix = "/32" if version == 4 else "/128"
    # neighbour discovery done first: a datagram queued behind it could miss the probe's wait
    assert pair.gw.ping(remote), f"no ping reply from {remote} over the veth pair"
    # the gateway's IPsec policies cover the peer: all we send it, all it sends us
    policy = ["ip", "xfrm", "policy", "add"]
    out = ["src", local + prefix, "dst", remote + prefix, "proto", "udp", "dport", str(PEER)]
    in_ = ["src", remote + prefix, "dst", local + prefix, "proto", "udp", "sport", str(PEER)]
    pair.gw.run([*policy, *out, "dir", "out", "action", "block"])
    pair.gw.run([*policy, *in_, "dir", "in", "action", "block"])
    probe = [sys.executable, "-c", PROBE, local, remote, f"/run/netns/{pair.peer.name}"]
    result = json.loads(pair.gw.run(probe).stdout)

    # UDP_ENCAP_ESPINUDP (2) on the NAT-T socket only
    assert result["encap"] == {"ike": 0, "natt": 2}
    # out: the bypassed IKE sockets reach the peer, the plain socket is refused by the policy
    assert result["sent"] == {"ike": "sent", "natt": "sent", "plain": "EPERM"}
    assert result["peer_got"] == ["ike", "natt"]
    # in: the peer's IKE reaches both IKE sockets, the plain socket's copy is blocked; the
    # ESP-in-UDP datagram and the NAT-keepalive reach the port-500 socket as UDP, while on
    # the NAT-T socket the kernel takes them (no SA for the ESP here: dropped) and only IKE
    # arrives
    in_ike = MARKER + b"in".hex()
    assert sorted(result["got"]["ike"]) == sorted([in_ike, ESP, "ff"])
    assert result["got"]["natt"] == [in_ike]
    assert result["got"]["plain"] == []


# runs inside the gateway namespace: NAT-T sockets as ingress opens them for each backend,
# ESP-in-UDP from the peer to each, and the ICMP destination unreachables the gateway sent
NO_ICMP = f"""
import ctypes, json, os, socket, sys, time
from ikefarm.services.ingress.sockets import open_udp_socket
from ikefarm.shared.xfrm_socket import decapsulate_esp_in_udp
local, remote, peer_netns = sys.argv[1:4]
family = socket.AF_INET6 if ":" in local else socket.AF_INET
def enter(path):
    fd = os.open(path, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + path)
    os.close(fd)
def unreachables():
    if family == socket.AF_INET:
        rows = [l.split() for l in open("/proc/net/snmp") if l.startswith("Icmp:")]
        return int(rows[1][rows[0].index("OutDestUnreachs")])
    rows = [l.split() for l in open("/proc/net/snmp6") if l.startswith("Icmp6OutDestUnreachs")]
    return int(rows[0][1])
home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
socks = {{
    # userspace, and `auto` until the kernel service says netlink: the steering filter only
    "userspace": open_udp_socket(local, {NATT}, drop_esp=True),
    # `auto` told netlink, then told userspace: UDP_ENCAP set and cleared again
    "cleared": open_udp_socket(local, {NATT} + 1, drop_esp=True, kernel_esp=True),
    # netlink: UDP_ENCAP stays (the control: this kernel's answer to ESP it has no state for)
    "netlink": open_udp_socket(local, {NATT} + 2, kernel_esp=True),
}}
decapsulate_esp_in_udp(socks["cleared"], on=False)
encap = {{n: s.getsockopt(17, 100) for n, s in socks.items()}}
out = {{"encap": encap, "icmp": {{}}, "refused": {{}}}}
enter(peer_netns)
peers = {{}}
for offset, name in enumerate(socks):
    peers[name] = socket.socket(family, socket.SOCK_DGRAM)
    peers[name].connect((local, {NATT} + offset))
enter(f"/proc/self/fd/{{home_fd}}")
for name, peer in peers.items():
    before = unreachables()
    peer.send(bytes.fromhex("{ESP}") + bytes(200))
    time.sleep(0.3)
    out["icmp"][name] = unreachables() - before
    # a connected UDP socket that got an ICMP unreachable reports it (ECONNREFUSED)
    out["refused"][name] = peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
print(json.dumps(out))
"""


@pytest.mark.parametrize("version", [4, 6])
def test_no_icmp_unreachable_for_esp_in_udp_without_the_kernel_dataplane(
    pair: NetnsPair, version: int
) -> None:
    """With the userspace dataplane (or `auto` until told netlink, or told userspace after
    netlink) the NAT-T socket carries no UDP_ENCAP, so the kernel answers no ESP-in-UDP with
    an ICMP error (a NAT or docker's UDP proxy would end the peer's mapping on it)."""
    local, remote = (pair.gw_v4, pair.peer_v4) if version == 4 else (pair.gw_v6, pair.peer_v6)
    assert pair.gw.ping(remote), f"no ping reply from {remote} over the veth pair"
    probe = [sys.executable, "-c", NO_ICMP, local, remote, f"/run/netns/{pair.peer.name}"]
    result = json.loads(pair.gw.run(probe).stdout)

    assert result["encap"] == {"userspace": 0, "cleared": 0, "netlink": 2}
    assert result["icmp"]["userspace"] == 0 and result["refused"]["userspace"] == 0
    assert result["icmp"]["cleared"] == 0 and result["refused"]["cleared"] == 0
    if not probe_esp(pair.gw.name)[0]:
        # the control: this kernel (no ESP states) does answer on a UDP_ENCAP socket, so
        # the zeros above are not a probe that cannot see ICMP
        assert result["icmp"]["netlink"] >= 1
