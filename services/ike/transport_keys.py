"""The public transport keys an ike worker seals key material to (`shared/bus/sealed.py`).

The keystore's (PPK mixing, RFC 8784) and the kernel service's (child SA keys,
`shared/bus/child_keys.py`): each fetched once on its request subject and kept.
The reply can only come from the service that subscribes to that subject (the
bus permissions give `ikefarm.<service>.>` to that service's user alone, and a
reply lands in this worker's own inbox). A key that stops working (the service
restarted with a new one) is forgotten and fetched again on next use.
"""

from __future__ import annotations

from ikefarm.proto.messages import TransportKeyReply, TransportKeyRequest
from ikefarm.shared.bus.runtime import Runtime


class TransportKey:
    def __init__(self, runtime: Runtime, subject: str, timeout: float) -> None:
        self.runtime = runtime
        self.subject = subject
        self.timeout = timeout
        self._public: bytes | None = None

    async def get(self) -> bytes:
        if self._public is None:
            reply = await self.runtime.request(
                self.subject, TransportKeyRequest(), TransportKeyReply, timeout=self.timeout
            )
            self._public = reply.public_key
        return self._public

    def forget(self) -> None:
        self._public = None
