"""EAP relayed to RADIUS, and the AUTH from the MSK (RFC 7296 2.16, RFC 3579).

The ike worker is the EAP authenticator in pass-through mode: it carries each EAP
message of the peer here, this relays it to the RADIUS server (EAP-Message split in
253-octet attributes, Message-Authenticator, the server's State sent back), and returns
the server's EAP message. Methods are the server's business.

On Access-Accept the MSK (MS-MPPE-Recv-Key | MS-MPPE-Send-Key) is sealed with AES-256-GCM
under a key made on the keystore's first start and kept in its encrypted store, bound to
the conversation's session name; the worker holds only that opaque blob until the peer's
last AUTH arrives, and then asks for the AUTH computations (`auth`), which open it here.
Nothing the keystore keeps grows with the conversations in flight.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv6Address

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyrad.packet import AccessAccept, AccessChallenge

from ikefarm.proto.messages import (
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    PskAuthReply,
    RadiusAccounting,
    RadiusAccountingReply,
)
from ikefarm.services.keystore import radius
from ikefarm.services.keystore.psk import KEY_PAD, UnsupportedPrf
from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.ikev2.crypto.prf import SUPPORTED_PRFS, Prf

MSK_KEY = ("eap-key", "msk")  # (kind, name) in the store
MSK_AD = b"ikefarm eap msk v1|"
NONCE = 12
EAP_SUCCESS = 3
EAP_FAILURE = 4

REASON_REJECT = "access_reject"
REASON_UNAVAILABLE = "radius_unavailable"
REASON_NO_EAP = "no_eap_message"
REASON_MISMATCH = "auth_mismatch"
REASON_SEAL = "msk_seal_broken"


def new_msk_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def eap_code(eap: bytes) -> int | None:
    return eap[0] if len(eap) >= 4 else None


class EapRelay:
    def __init__(self, client: radius.RadiusClient, msk_key: bytes, counters: Counter[str]) -> None:
        self.client = client
        self._aead = AESGCM(msk_key)
        self.counters = counters

    def __repr__(self) -> str:
        return f"EapRelay({self.client!r})"

    # -- the MSK, sealed to ourselves ------------------------------------------------------

    def seal_msk(self, session: str, msk: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, msk, MSK_AD + session.encode())

    def open_msk(self, session: str, sealed: bytes) -> bytes | None:
        if len(sealed) <= NONCE:
            return None
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], MSK_AD + session.encode())
        except InvalidTag:
            return None

    # -- relay -----------------------------------------------------------------------------

    def access_attributes(self, request: EapRelayRequest) -> list[tuple[int, bytes]]:
        attributes = [
            (radius.USER_NAME, request.identity[: radius.ATTRIBUTE_MAX]),
            (radius.SERVICE_TYPE, struct.pack("!L", radius.SERVICE_TYPE_FRAMED)),
            (radius.NAS_PORT_TYPE, struct.pack("!L", radius.NAS_PORT_TYPE_VIRTUAL)),
        ]
        if request.called_station:
            attributes.append((radius.CALLED_STATION_ID, request.called_station.encode()[:253]))
        if request.calling_station:
            attributes.append((radius.CALLING_STATION_ID, request.calling_station.encode()[:253]))
        attributes += [(radius.EAP_MESSAGE, chunk) for chunk in radius.split_eap(request.eap)]
        if request.state:
            attributes.append((radius.STATE, request.state[: radius.ATTRIBUTE_MAX]))
        return attributes

    async def relay(self, request: EapRelayRequest) -> EapRelayReply:
        try:
            answer = await self.client.access(self.access_attributes(request), request.server)
        except radius.RadiusUnavailable as exc:
            self.counters["eap.radius_unavailable"] += 1
            return EapRelayReply(outcome="error", reason=f"{REASON_UNAVAILABLE}: {exc}")
        reply = answer.packet
        eap = b"".join(reply.get(radius.EAP_MESSAGE, []))
        state = b"".join(reply.get(radius.STATE, [])[:1])
        if reply.code == AccessChallenge:
            if eap_code(eap) is None or len(eap) != int.from_bytes(eap[2:4], "big"):
                self.counters["eap.challenge_without_eap"] += 1
                return EapRelayReply(outcome="reject", reason=REASON_NO_EAP, server=answer.server)
            self.counters["eap.challenge"] += 1
            return EapRelayReply(outcome="challenge", eap=eap, state=state, server=answer.server)
        if reply.code == AccessAccept:
            msk = radius.mppe_msk(reply, answer.request)
            sealed = self.seal_msk(request.session, msk) if msk is not None else b""
            self.counters["eap.accept"] += 1
            if eap_code(eap) != EAP_SUCCESS:
                eap = bytes((EAP_SUCCESS, eap_identifier(request.eap), 0, 4))
            return EapRelayReply(
                outcome="accept",
                eap=eap,
                server=answer.server,
                sealed_msk=sealed,
                attributes=radius.framed_attributes(reply),
            )
        self.counters["eap.reject"] += 1
        if eap_code(eap) != EAP_FAILURE:
            eap = bytes((EAP_FAILURE, eap_identifier(request.eap), 0, 4))
        return EapRelayReply(outcome="reject", eap=eap, server=answer.server, reason=REASON_REJECT)

    # -- AUTH from the MSK (RFC 7296 2.16) ------------------------------------------------

    def auth(self, request: EapAuthRequest) -> PskAuthReply:
        """Verify the peer's AUTH and compute ours with the MSK as the shared key."""
        if request.prf_id not in SUPPORTED_PRFS:
            raise UnsupportedPrf(request.prf_id)
        msk = self.open_msk(request.session, request.sealed_msk)
        if msk is None:
            return PskAuthReply(verified=False, auth=b"", reason=REASON_SEAL)
        prf = Prf(request.prf_id)
        key = prf.compute(Secret(msk).value, KEY_PAD)
        expected = prf.compute(key, request.verify_octets)
        if not hmac.compare_digest(expected, request.verify_auth):
            return PskAuthReply(verified=False, auth=b"", reason=REASON_MISMATCH)
        return PskAuthReply(verified=True, auth=prf.compute(key, request.sign_octets))

    # -- accounting (RFC 2866) --------------------------------------------------------------

    async def account(self, request: RadiusAccounting) -> RadiusAccountingReply:
        status = radius.ACCT_STATUS.get(request.status)
        if status is None:
            raise ValueError(f"status {request.status!r} is not start, interim or stop")
        attributes = accounting_attributes(request, status)
        try:
            await self.client.accounting(attributes)
        except radius.RadiusUnavailable as exc:
            self.counters[f"accounting.{request.status}.unanswered"] += 1
            return RadiusAccountingReply(sent=False, reason=str(exc))
        self.counters[f"accounting.{request.status}.answered"] += 1
        return RadiusAccountingReply(sent=True)


def eap_identifier(eap: bytes) -> int:
    return eap[1] if len(eap) >= 2 else 0


def _u32(value: int) -> bytes:
    return struct.pack("!L", value & 0xFFFFFFFF)


def accounting_attributes(request: RadiusAccounting, status: int) -> list[tuple[int, bytes]]:
    """The attributes of one Accounting-Request (RFC 2866 5; octets over 2^32 in the
    Gigawords attributes, RFC 2869 5.1-5.2)."""
    attributes = [
        (radius.ACCT_STATUS_TYPE, _u32(status)),
        (radius.ACCT_SESSION_ID, request.session.encode()[:253]),
        (radius.USER_NAME, request.identity.encode()[:253]),
        (radius.SERVICE_TYPE, _u32(radius.SERVICE_TYPE_FRAMED)),
        (radius.NAS_PORT_TYPE, _u32(radius.NAS_PORT_TYPE_VIRTUAL)),
    ]
    if request.called_station:
        attributes.append((radius.CALLED_STATION_ID, request.called_station.encode()[:253]))
    if request.calling_station:
        attributes.append((radius.CALLING_STATION_ID, request.calling_station.encode()[:253]))
    for address in request.framed_addresses:
        if ":" in address:
            attributes.append((radius.FRAMED_IPV6_ADDRESS, IPv6Address(address).packed))
        else:
            attributes.append((radius.FRAMED_IP_ADDRESS, IPv4Address(address).packed))
    if status != radius.ACCT_STATUS["start"]:
        attributes += [
            (radius.ACCT_SESSION_TIME, _u32(request.session_time)),
            (radius.ACCT_INPUT_OCTETS, _u32(request.input_octets)),
            (radius.ACCT_OUTPUT_OCTETS, _u32(request.output_octets)),
            (radius.ACCT_INPUT_GIGAWORDS, _u32(request.input_octets >> 32)),
            (radius.ACCT_OUTPUT_GIGAWORDS, _u32(request.output_octets >> 32)),
            (radius.ACCT_INPUT_PACKETS, _u32(request.input_packets)),
            (radius.ACCT_OUTPUT_PACKETS, _u32(request.output_packets)),
        ]
    if status == radius.ACCT_STATUS["stop"]:
        cause = radius.TERMINATE_CAUSES.get(request.terminate_cause, 10)
        attributes.append((radius.ACCT_TERMINATE_CAUSE, _u32(cause)))
    return attributes
