"""Reassembly of IKEv2 fragments (RFC 7383 2.6).

One `FragmentReassembler` per (IKE SA, Message ID). Each fragment is verified
and decrypted on its own before it is fed (`decrypt_fragment`), so a forged
fragment never displaces a real one. Bounds: Total Fragments at most
`max_fragments`, the reassembled plaintext at most `max_size` octets.

Total Fragments changing mid-way (RFC 7383 2.6, the sender re-fragmenting
after PMTU discovery, 2.5.2): a larger total discards what was collected and
starts over with the new fragment; a smaller one is discarded.
"""

from __future__ import annotations

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import (
    IkeHeader,
    Message,
    ParsedMessage,
    SkProtectionLike,
    decode_inner,
    decrypt_fragment,
)
from ikefarm.shared.ikev2.payloads import SkfPayload

DEFAULT_MAX_FRAGMENTS = 32
DEFAULT_MAX_SIZE = 64 * 1024


class FragmentReassembler:
    """Collects the verified plaintext chunks of one fragmented message."""

    def __init__(
        self,
        message_id: int,
        *,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if max_fragments < 1 or max_size < 1:
            raise ValueError("max_fragments and max_size must be positive")
        self.message_id = message_id
        self.max_fragments = max_fragments
        self.max_size = max_size
        self.header: IkeHeader | None = None
        self.total = 0
        self.first_payload: int = PayloadType.NONE
        self._chunks: dict[int, bytes] = {}
        self._size = 0
        self._complete: bytes | None = None

    @property
    def received(self) -> int:
        return len(self._chunks)

    @property
    def complete(self) -> bool:
        return self._complete is not None

    def _reset(self) -> None:
        self._chunks.clear()
        self._size = 0
        self.header = None
        self.first_payload = PayloadType.NONE

    def feed(self, parsed: ParsedMessage, plaintext: bytes) -> bytes | None:
        """Add one verified fragment; the whole inner plaintext once all are in, else None.

        Duplicates (and anything after completion) are ignored: None. Bad
        fragments raise `MalformedMessage` and leave the collected ones intact,
        except an overflow of `max_size`, which discards everything.
        """
        fragment = parsed.encrypted
        if not isinstance(fragment, SkfPayload):
            raise MalformedMessage("not_a_fragment")
        if parsed.header.message_id != self.message_id:
            raise MalformedMessage("fragment_message_id_mismatch")
        number, total = fragment.fragment_number, fragment.total_fragments
        if not 1 <= number <= total:  # also checked by the decoder; cheap to repeat
            raise MalformedMessage("bad_fragment_number", f"fragment {number} of {total}")
        if total > self.max_fragments:
            raise MalformedMessage("too_many_fragments", f"{total} > {self.max_fragments}")
        if self._complete is not None:
            return None
        if total < self.total:
            raise MalformedMessage("fragment_total_mismatch", f"{total} < {self.total}")
        if total > self.total:
            self._reset()
            self.total = total
        if number in self._chunks:
            return None
        if self._size + len(plaintext) > self.max_size:
            self._reset()
            self.total = 0
            raise MalformedMessage("fragments_too_large", f"over {self.max_size} octets")
        self._chunks[number] = bytes(plaintext)
        self._size += len(plaintext)
        if self.header is None:
            self.header = parsed.header
        if number == 1:
            self.first_payload = parsed.inner_first_payload
        if len(self._chunks) < self.total:
            return None
        self._complete = b"".join(self._chunks[n] for n in range(1, self.total + 1))
        self._chunks.clear()
        return self._complete

    def to_message(self) -> Message:
        """The reassembled protected `Message` (after `feed` returned the plaintext)."""
        if self._complete is None or self.header is None:
            raise ValueError("reassembly is not complete")
        return decode_inner(self.header, self.first_payload, self._complete)

    def receive(
        self, parsed: ParsedMessage, protection: SkProtectionLike, sk_e: bytes, sk_a: bytes
    ) -> Message | None:
        """Verify, decrypt and feed one fragment; the decoded message once complete.

        Raises the crypto package's IntegrityCheckFailed / MalformedEncryptedPayload
        for a fragment that fails verification (nothing is stored), and
        `MalformedMessage` as `feed` and the inner decoder do.
        """
        plaintext = decrypt_fragment(parsed, protection, sk_e, sk_a)
        if self.feed(parsed, plaintext) is None:
            return None
        return self.to_message()
