"""IKEv2 payloads (RFC 7296 section 3, RFC 7383 2.5): one module per family.

Importing this package registers every payload class with the chain decoder.
"""

from ikefarm.shared.ikev2.payloads.auth import AuthPayload
from ikefarm.shared.ikev2.payloads.base import (
    Chain,
    Payload,
    UnknownPayload,
    decode_chain,
    encode_chain,
    payload_class,
)
from ikefarm.shared.ikev2.payloads.cert import CertPayload, CertReqPayload
from ikefarm.shared.ikev2.payloads.config import ConfigAttribute, CpPayload
from ikefarm.shared.ikev2.payloads.delete import DeletePayload
from ikefarm.shared.ikev2.payloads.eap import EapPayload
from ikefarm.shared.ikev2.payloads.encrypted import SkfPayload, SkPayload
from ikefarm.shared.ikev2.payloads.fields import FieldTable
from ikefarm.shared.ikev2.payloads.identity import IdPayload
from ikefarm.shared.ikev2.payloads.ke import KePayload
from ikefarm.shared.ikev2.payloads.nonce import NoncePayload
from ikefarm.shared.ikev2.payloads.notify import NotifyPayload
from ikefarm.shared.ikev2.payloads.sa import Proposal, RawAttribute, SaPayload, Transform
from ikefarm.shared.ikev2.payloads.ts import TrafficSelector, TsPayload, UnknownSelector
from ikefarm.shared.ikev2.payloads.vendor import VendorIdPayload

__all__ = [
    "AuthPayload",
    "CertPayload",
    "CertReqPayload",
    "Chain",
    "ConfigAttribute",
    "CpPayload",
    "DeletePayload",
    "EapPayload",
    "FieldTable",
    "IdPayload",
    "KePayload",
    "NoncePayload",
    "NotifyPayload",
    "Payload",
    "Proposal",
    "RawAttribute",
    "SaPayload",
    "SkPayload",
    "SkfPayload",
    "TrafficSelector",
    "Transform",
    "TsPayload",
    "UnknownPayload",
    "UnknownSelector",
    "VendorIdPayload",
    "decode_chain",
    "encode_chain",
    "payload_class",
]
