"""Hostile bytes into the userspace dataplane (services/kernel/dataplane.py, userspace.py).

Whatever arrives on an ESP socket, nothing but a genuine packet comes out for
the TUN device, nothing raises, every drop is counted, and the next genuine
packet still goes through. The same for whatever the TUN device hands over.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.services.kernel.dataplane import Dataplane, selector_networks
from ikefarm.services.kernel.userspace import _ipv4_payload_offset, _udp_payload_offset
from tests.unit.test_userspace_dataplane import packet, tunnel_pair

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def setup() -> tuple[Dataplane, Dataplane, list[bytes]]:
    gw, peer = Dataplane(), Dataplane()
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    gw.add(ours)
    peer.add(theirs)
    genuine = []
    for seq in range(1, 4):
        send = peer.outbound(packet("10.200.0.7", "10.100.0.1", seq=seq))
        assert send is not None
        genuine.append(send.esp)
    return gw, peer, genuine


def drops(dataplane: Dataplane) -> int:
    return sum(v for k, v in dataplane.counters.items() if k.startswith("esp.in.drop."))


@FUZZ
@given(junk=st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_never_reach_the_tun(junk: list[bytes]) -> None:
    gw, _peer, genuine = setup()
    spi = genuine[0][:4]
    for data in junk:
        for candidate in (data, spi + data):  # unknown SPI, and the real SPI with junk after
            assert gw.inbound(candidate) is None
    assert drops(gw) == 2 * len(junk)
    assert gw.inbound(genuine[0]) is not None


@FUZZ
@given(
    which=st.integers(0, 2),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
    cut=st.integers(0, 10_000),
)
def test_mutated_and_truncated_packets_never_reach_the_tun(
    which: int, position: int, flip: int, cut: int
) -> None:
    gw, _peer, genuine = setup()
    original = genuine[which]
    mutated = bytearray(original)
    mutated[position % len(original)] ^= flip
    assert gw.inbound(bytes(mutated)) is None
    assert gw.inbound(original[: cut % len(original)]) is None
    assert drops(gw) == 2
    for esp in genuine:  # nothing moved the window: every genuine packet still opens once
        assert gw.inbound(esp) is not None
        assert gw.inbound(esp) is None


@FUZZ
@given(data=st.binary(max_size=120))
def test_anything_from_the_tun_is_sent_only_when_it_is_a_packet_for_a_tunnel(data: bytes) -> None:
    gw, peer, _genuine = setup()
    send = gw.outbound(data)
    if send is not None:
        assert peer.inbound(send.esp) == data


@FUZZ
@given(data=st.binary(max_size=80))
def test_socket_header_offsets_stay_inside_the_datagram(data: bytes) -> None:
    for offset_of in (_ipv4_payload_offset, _udp_payload_offset):
        offset = offset_of(data)
        assert offset is None or 20 <= offset <= len(data)


@FUZZ
@given(
    selector=st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda a, b: f"{a}..{b}",
            st.ip_addresses().map(str),
            st.ip_addresses().map(str),
        ),
    )
)
def test_any_selector_text_is_networks_or_a_clear_refusal(selector: str) -> None:
    try:
        networks = selector_networks(selector)
    except (ValueError, NotImplementedError):
        return
    assert networks and all(n.version == networks[0].version for n in networks)
