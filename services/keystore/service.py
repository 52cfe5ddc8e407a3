"""Keystore: holds PSKs, PPKs and private keys; computes what needs them, returns no secret.

Endpoint `subjects.KEYSTORE_PSK_AUTH` (PskAuthRequest -> PskAuthReply): the
PSK AUTH of RFC 7296 2.15, verified and computed here (`psk.py`), so the
`[[ike.pre-shared-key]]` secrets never travel on the bus (DESIGN principle 4).
"""

from __future__ import annotations

from typing import Any

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.psk import PskStore, UnknownPurpose, UnsupportedPrf
from ikefarm.shared.bus.runtime import Runtime, ServiceBase


class KeystoreService(ServiceBase):
    name = "keystore"
    subsystem = "config"
    description = "ikefarm keystore: secret-bearing computations, secrets never leave"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.psks = PskStore([])

    async def setup(self) -> None:
        self.psks = PskStore.from_config(self.config)
        await self.runtime.add_endpoint(
            "psk-auth", PskAuthRequest, self.on_psk_auth, subject=subjects.KEYSTORE_PSK_AUTH
        )
        self.log.control("psk_loaded", entries=len(self.psks))

    def gauges(self) -> dict[str, Any]:
        return {"psk_entries": len(self.psks)}

    async def on_psk_auth(self, request: PskAuthRequest, _msg: Any) -> PskAuthReply:
        try:
            reply, entry = self.psks.authenticate(request)
        except UnsupportedPrf as exc:
            self.runtime.counters["psk_auth.bad_prf"] += 1
            raise BusError("bad_field", f"PskAuthRequest.{exc}") from None
        except UnknownPurpose as exc:
            self.runtime.counters["psk_auth.bad_purpose"] += 1
            raise BusError("bad_field", f"PskAuthRequest.{exc}") from None
        outcome = "verified" if reply.verified else reply.reason.replace("auth_", "")
        self.runtime.counters[f"psk_auth.{outcome}"] += 1
        self.log.at(
            1 if not reply.verified else 2,
            "psk_auth",
            result=outcome,
            local_id=request.local_id,
            remote_id=request.remote_id,
            entry=entry.label if entry is not None else None,
            prf_id=request.prf_id,
        )
        return reply
