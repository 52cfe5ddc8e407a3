"""The ike worker's side of PPK mixing (RFC 8784 3): the engine's keys go to the keystore sealed.

The engine emits a `KeystoreRequest` carrying a `PpkMix(prf_id, ppk_id, keys)`. Here
SK_d | SK_pi | SK_pr are sealed to the keystore's transport key with a fresh
ephemeral X25519 key (`shared/bus/sealed.py`), and SK_d' | SK_pi' | SK_pr' come
back sealed on the same channel; the bus sees neither, nor the PPK, which never
leaves the keystore. The transport public key is fetched once and kept; a
reply that does not open drops it so the next request fetches it again (a
keystore restarted with a new store).
"""

from __future__ import annotations

from dataclasses import replace

from ikefarm.proto import subjects
from ikefarm.proto.messages import PpkMixReply, PpkMixRequest
from ikefarm.services.ike.transport_keys import TransportKey
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.bus.sealed import REPLY, REQUEST, SealedChannel, SealError
from ikefarm.shared.ikev2.effects import PpkMix, PpkMixed


class PpkClient:
    def __init__(self, runtime: Runtime, timeout: float) -> None:
        self.runtime = runtime
        self.timeout = timeout
        self.transport_key = TransportKey(runtime, subjects.KEYSTORE_TRANSPORT_KEY, timeout)

    async def mix(self, call: PpkMix) -> PpkMixed:
        """The opened answer for the engine; raises on a bus error or a reply that does not open."""
        keys = call.keys
        channel, ephemeral = SealedChannel.open_to(await self.transport_key.get())
        request = PpkMixRequest(
            prf_id=call.prf_id,
            ppk_id=call.ppk_id,
            ephemeral=ephemeral,
            sealed_keys=channel.seal(REQUEST, keys.sk_d + keys.sk_pi + keys.sk_pr),
        )
        try:
            reply = await self.runtime.request(
                subjects.KEYSTORE_PPK_MIX, request, PpkMixReply, timeout=self.timeout
            )
        except Exception:
            self.transport_key.forget()  # perhaps another transport key now: fetch it next time
            raise
        if not reply.found:
            return PpkMixed(found=False, reason=reply.reason)
        try:
            plain = channel.open(REPLY, reply.sealed_keys)
        except SealError:
            self.transport_key.forget()
            raise
        size = len(keys.sk_d)
        if len(plain) != 3 * size:
            raise SealError("mixed keys have the wrong length")
        mixed = replace(
            keys, sk_d=plain[:size], sk_pi=plain[size : 2 * size], sk_pr=plain[2 * size :]
        )
        return PpkMixed(found=True, keys=mixed)
