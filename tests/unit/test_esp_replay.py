"""Anti-replay (RFC 4303 3.4.3, Appendix A): the window alone, then through whole SAs."""

from __future__ import annotations

import pytest

from ikefarm.shared.esp import Dropped, DropReason, ReplayWindow, Unwrapped
from tests.esp_helpers import ALGORITHMS, SPI, direction, ipv4_packet

WRAP = 1 << 32


def receive(window: ReplayWindow, seq_lo: int) -> int | None:
    """What decapsulate does for a packet whose ICV verifies."""
    seq = window.check(seq_lo)
    if seq is not None:
        window.update(seq)
    return seq


def test_in_order_late_duplicate_and_too_old() -> None:
    window = ReplayWindow(32, esn=False)
    assert [receive(window, n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    assert receive(window, 5) is None  # duplicate
    assert receive(window, 40) == 40  # a jump ahead slides the window
    assert receive(window, 9) == 9  # late, inside the window: accepted once
    assert receive(window, 9) is None
    assert receive(window, 8) is None  # 32 behind the top: left of the window
    assert receive(window, 40) is None
    assert window.top == 40


def test_window_slides_and_forgets() -> None:
    window = ReplayWindow(64, esn=False)
    for n in (1, 3, 70):
        receive(window, n)
    assert receive(window, 7) == 7  # 63 behind: the last slot
    assert receive(window, 6) is None
    assert receive(window, 200) == 200
    assert receive(window, 137) == 137 and receive(window, 136) is None
    assert receive(window, 137) is None
    # numbers between that never came are still accepted once
    assert [receive(window, n) for n in (150, 199, 198)] == [150, 199, 198]
    assert [receive(window, n) for n in (150, 199, 198)] == [None, None, None]


@pytest.mark.parametrize("size", [1, 32, 4096])
def test_window_edges(size: int) -> None:
    window = ReplayWindow(size, esn=False)
    top = size + 100
    receive(window, top)
    assert window.check(top - size) is None
    if size > 1:
        assert receive(window, top - size + 1) == top - size + 1
        assert receive(window, top - size + 1) is None
    assert receive(window, top) is None


def test_sequence_number_zero_is_never_accepted() -> None:
    """RFC 4303 3.3.3: the first packet carries 1."""
    assert ReplayWindow(32, esn=False).check(0) is None
    assert ReplayWindow(0, esn=False).check(0) is None
    assert ReplayWindow(32, esn=True).check(0) is None


def test_window_off_accepts_duplicates() -> None:
    window = ReplayWindow(0, esn=False)
    assert [receive(window, n) for n in (5, 5, 1, 5)] == [5, 5, 1, 5]


@pytest.mark.parametrize("size", [-1, 4097])
def test_window_size_is_bounded(size: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.4096"):
        ReplayWindow(size, esn=False)


def test_esn_inference_case_a_and_b() -> None:
    """Appendix A2.2: the subspace of seq-lo relative to the window."""
    window = ReplayWindow(32, esn=True, top=5 * WRAP + 100)  # Case A: window in one subspace
    assert window.infer(100) == 5 * WRAP + 100
    assert window.infer(69) == 5 * WRAP + 69  # bottom of the window
    assert window.infer(68) == 6 * WRAP + 68  # below the window: the next subspace
    assert window.infer(WRAP - 1) == 5 * WRAP + WRAP - 1
    window = ReplayWindow(32, esn=True, top=5 * WRAP + 10)  # Case B: spans two subspaces
    assert window.infer(10) == 5 * WRAP + 10
    assert window.infer(WRAP - 21) == 4 * WRAP + WRAP - 21  # in the window, last subspace
    assert window.infer(WRAP - 22) == 5 * WRAP + WRAP - 22  # ahead
    assert ReplayWindow(32, esn=True).infer(WRAP - 1) is None  # before the first packet
    assert ReplayWindow(32, esn=True, top=(1 << 64) - 1).infer(1) is None  # past the last


def test_esn_without_anti_replay_infers_the_closest_subspace() -> None:
    window = ReplayWindow(0, esn=True, top=3 * WRAP + 10)
    assert window.infer(WRAP - 5) == 2 * WRAP + WRAP - 5
    assert window.infer(1 << 30) == 3 * WRAP + (1 << 30)
    assert receive(window, 12) == 3 * WRAP + 12 and receive(window, 12) == 3 * WRAP + 12


@pytest.mark.parametrize("names", [ALGORITHMS[2], ALGORITHMS[4]], ids=["gcm", "cbc"])
def test_esn_across_the_2_32_wrap(names: tuple[str, str | None]) -> None:
    """The counter passes 2^32 with ESN: every packet accepted, every replay dropped."""
    outbound, inbound = direction(names, esn=True, seq=WRAP - 3, highest_seq=WRAP - 3)
    packets = [outbound.encapsulate(ipv4_packet(seq=n)) for n in range(6)]
    assert [int.from_bytes(p[4:8], "big") for p in packets] == [
        WRAP - 2,
        WRAP - 1,
        0,
        1,
        2,
        3,
    ]
    # out of order across the wrap: the one before the wrap arrives after two after it
    order = [0, 2, 3, 1, 4, 5]
    for index in order:
        result = inbound.decapsulate(packets[index])
        assert result == Unwrapped(ipv4_packet(seq=index), SPI, WRAP - 2 + index)
    assert inbound.window.top == WRAP + 3
    for packet in packets:
        result = inbound.decapsulate(packet)
        assert isinstance(result, Dropped) and result.reason == DropReason.REPLAY
    assert inbound.counters.packets == 6 and inbound.counters.drops == {"replay": 6}
    # the sender goes on in the new subspace
    fresh = outbound.encapsulate(ipv4_packet())
    assert inbound.decapsulate(fresh) == Unwrapped(ipv4_packet(), SPI, WRAP + 4)


def test_without_esn_the_receiver_never_wraps() -> None:
    outbound, inbound = direction(esn=False, seq=WRAP - 3, highest_seq=WRAP - 3)
    for seq in (WRAP - 2, WRAP - 1):
        result = inbound.decapsulate(outbound.encapsulate(ipv4_packet()))
        assert isinstance(result, Unwrapped) and result.seq == seq
    assert inbound.window.check(1) is None  # far left of the window, not a new cycle


@pytest.mark.parametrize("names", [ALGORITHMS[2], ALGORITHMS[3], ALGORITHMS[4]])
@pytest.mark.parametrize("esn", [False, True])
def test_broken_icv_does_not_move_the_window(names: tuple[str, str | None], esn: bool) -> None:
    """RFC 4303 3.4.3: the window is updated only after the integrity check passes."""
    outbound, inbound = direction(names, esn=esn)
    first = outbound.encapsulate(ipv4_packet())
    assert isinstance(inbound.decapsulate(first), Unwrapped)
    packets = [outbound.encapsulate(ipv4_packet(seq=n)) for n in range(2, 5)]
    broken = packets[0][:-1] + bytes([packets[0][-1] ^ 1])
    assert inbound.decapsulate(broken) == Dropped(DropReason.INTEGRITY, SPI, 2)
    # a forgery far ahead must not push the window past genuine traffic either
    forged = packets[1][:4] + (1 << 31).to_bytes(4, "big") + packets[1][8:]
    assert inbound.decapsulate(forged).reason == DropReason.INTEGRITY  # type: ignore[union-attr]
    assert inbound.window.top == 1
    for n, packet in enumerate(packets, start=2):
        assert inbound.decapsulate(packet) == Unwrapped(ipv4_packet(seq=n), SPI, n)
    assert inbound.counters.drops == {"integrity": 2}
