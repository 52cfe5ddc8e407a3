"""The receiver's anti-replay window (RFC 4303 3.4.3, Appendix A).

The window remembers the highest authenticated sequence number `top` and a
bitmap of the `size` numbers ending at it (bit i set: `top - i` was received).
`check` runs before the ICV is verified and never changes state; `update` runs
only once the packet has passed its integrity check (RFC 4303 3.4.3), so a
forged packet cannot move the window.

With ESN only the low 32 bits travel; `check` infers the high-order bits as in
Appendix A2.2 and returns the full 64-bit number that the ICV must then verify
under. With anti-replay off (`size` 0) no packet is refused as a replay, but ESN
still needs a reference for the inference: the window then infers as if it were
2^31 wide, i.e. a number is taken from the subspace that puts it closest to
`top`. Re-synchronisation after a loss of 2^32 packets (Appendix A3) is not done.
"""

from __future__ import annotations

__all__ = ["MAX_REPLAY_WINDOW", "ReplayWindow"]

MAX_REPLAY_WINDOW = 4096  # the configuration's bound for `replay-window`, as XFRM's
_SUBSPACE = 1 << 32
_LOW = _SUBSPACE - 1
_INFERENCE_WITHOUT_WINDOW = 1 << 31


class ReplayWindow:
    __slots__ = ("_bitmap", "_mask", "esn", "size", "top")

    def __init__(self, size: int, *, esn: bool, top: int = 0) -> None:
        if not 0 <= size <= MAX_REPLAY_WINDOW:
            raise ValueError(f"replay window must be 0..{MAX_REPLAY_WINDOW}, got {size}")
        limit = (1 << 64) - 1 if esn else _LOW
        if not 0 <= top <= limit:
            raise ValueError(f"highest sequence number must be 0..{limit}, got {top}")
        self.size = size
        self.esn = esn
        self.top = top
        self._mask = (1 << size) - 1
        # A window that starts above 0 (a test, an adopted SA) has seen nothing below `top`
        # except `top` itself, which was never sent when it is 0 (RFC 4303 3.3.3).
        self._bitmap = 1 if top else 0

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, esn={self.esn}, top={self.top})"

    def infer(self, seq_lo: int) -> int | None:
        """The full sequence number of a received seq-lo (Appendix A2.2); None if impossible."""
        if not self.esn:
            return seq_lo
        width = self.size or _INFERENCE_WITHOUT_WINDOW
        top_lo, top_hi = self.top & _LOW, self.top >> 32
        if top_lo >= width - 1:  # Case A: the window lies within one subspace
            seq_hi = top_hi if seq_lo >= top_lo - width + 1 else top_hi + 1
        else:  # Case B: the window spans two subspaces
            seq_hi = top_hi - 1 if seq_lo >= (top_lo - width + 1) & _LOW else top_hi
        if not 0 <= seq_hi <= _LOW:
            return None  # before the first number, or past the last one ever sent
        return (seq_hi << 32) | seq_lo

    def check(self, seq_lo: int) -> int | None:
        """The full sequence number if the packet may be new, None if it is a replay or too old.

        Sequence number 0 is never sent (RFC 4303 3.3.3), so it is refused like a replay.
        """
        seq = self.infer(seq_lo)
        if not seq:
            return None
        if self.size == 0 or seq > self.top:
            return seq
        behind = self.top - seq
        if behind >= self.size or (self._bitmap >> behind) & 1:
            return None
        return seq

    def update(self, seq: int) -> None:
        """Mark `seq` received; call only after the packet's ICV verified."""
        if seq > self.top:
            shift = seq - self.top
            self._bitmap = ((self._bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        elif self.size:
            self._bitmap |= 1 << (self.top - seq)
