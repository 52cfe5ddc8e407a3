"""Hostile bytes into the userspace dataplane (services/kernel/dataplane.py, userspace.py).

Whatever arrives on an ESP socket, nothing but a genuine packet comes out for
the TUN device, nothing raises, every drop is counted, and the next genuine
packet still goes through. The same for whatever the TUN device hands over.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.services.kernel.dataplane import Dataplane, selector_networks
from ikefarm.services.kernel.userspace import _ipv4_payload_offset, _udp_payload_offset
from tests.unit.test_dataplane_traps import trap as trap_of
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


@FUZZ
@given(
    inner=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                lambda d, tail: packet("10.100.0.1", f"10.200.0.{d}")[: 20 + tail],
                st.integers(0, 255),
                st.integers(0, 40),
            ),
        ),
        max_size=200,
    ),
    ticks=st.lists(st.floats(0, 40), max_size=200),
)
def test_tun_input_behind_a_trap_stays_bounded_and_counted(
    inner: list[bytes], ticks: list[float]
) -> None:
    """Random and truncated packets for a trap: nothing raises, the queue stays within its
    bound, every packet is queued or dropped by reason, ACQUIREs come at most once per
    timeout, and the child's installation releases only what was queued, in order."""
    now = [0.0]
    plane = Dataplane(acquire_timeout=30.0, queue_limit=8, clock=lambda: now[0])
    acquires: list[float] = []
    plane.on_acquire = lambda _trap, _packet: acquires.append(now[0])
    plane.add_trap(trap_of())
    for index, data in enumerate(inner):
        now[0] += ticks[index] if index < len(ticks) else 0.0
        assert plane.outbound(data) is None
        assert len(plane.traps[7].queue) <= 8
        if index % 7 == 0:
            plane.expire_acquires()
    c = plane.counters
    on_entry = ("malformed", "no_sa", "acquire_queue_full")
    assert c["esp.out.queued"] + sum(c[f"esp.out.drop.{r}"] for r in on_entry) == len(inner)
    assert c["esp.out.queued"] == c["esp.out.drop.acquire_timeout"] + len(plane.traps[7].queue)
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(acquires))
    queued = list(plane.traps[7].queue)
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    plane.add(ours)
    peer = Dataplane()
    peer.add(theirs)
    released = [peer.inbound(send.esp) for send in plane.release(7)]
    # in order; a queued packet the codec refuses (truncated) is dropped and counted
    assert released == [p for p in queued if p in released]
    assert len(released) + c["esp.out.drop.inner_malformed"] == len(queued)
