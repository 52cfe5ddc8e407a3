"""Certificate and Certificate Request payloads (RFC 7296 3.6, 3.7)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from ikefarm.shared.ikev2.constants import CertEncoding, PayloadType
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable


@register
@dataclass
class CertPayload(Payload):
    """Cert Encoding (1) | Certificate Data."""

    encoding: CertEncoding | int
    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.CERT
    FIELDS: ClassVar[FieldTable] = FieldTable("cert", ("encoding", "B"))
    TAIL: ClassVar[str | None] = "data"
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"encoding": CertEncoding}


@register
@dataclass
class CertReqPayload(Payload):
    """Cert Encoding (1) | Certification Authority (concatenated SHA-1 key hashes for X.509)."""

    encoding: CertEncoding | int
    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.CERTREQ
    FIELDS: ClassVar[FieldTable] = FieldTable("certreq", ("encoding", "B"))
    TAIL: ClassVar[str | None] = "data"
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"encoding": CertEncoding}
