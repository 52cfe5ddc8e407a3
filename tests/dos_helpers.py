"""Engines with the DoS admission (issue 5) and IKE_SA_INIT requests from many peers."""

from __future__ import annotations

from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.dos.admission import WorkerAdmission
from ikefarm.shared.dos.limits import dos_limits
from ikefarm.shared.ikev2.effects import Effect, Endpoint, SendDatagram
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from tests.engine_helpers import INITIATOR_TOML, RESPONDER_TOML, Side, Wire, config

GW = Endpoint("192.0.2.1", 500)


def guarded_pair(responder_extra: str = "", initiator_psk: bytes = b"shared-secret-0123456789"):  # type: ignore[no-untyped-def]
    """An initiator and a responder whose engine runs the worker's DoS admission."""
    responder_config = config(RESPONDER_TOML, responder_extra)
    responder = IkeEngine(
        engine_policy(responder_config),
        shard=1,
        dos=WorkerAdmission(dos_limits(responder_config), shard=1, workers=1),
    )
    initiator = IkeEngine(engine_policy(config(INITIATOR_TOML)), shard=2)
    return Wire(
        Side(initiator, initiator_psk, "192.0.2.2"),
        Side(responder, b"shared-secret-0123456789", "192.0.2.1"),
    )


def init_requests(count: int) -> list[bytes]:
    """`count` IKE_SA_INIT requests, each with its own SPIi (as from `count` initiators)."""
    initiator = IkeEngine(engine_policy(config(INITIATOR_TOML)), shard=2)
    out = []
    for _ in range(count):
        effects = initiator.initiate("hq", None, 0.0)
        out += [e.data for e in effects if isinstance(e, SendDatagram)]
    return out


def feed(engine: IkeEngine, data: bytes, peer: str, now: float = 1000.0) -> list[Effect]:
    return engine.receive(data, GW, Endpoint(peer, 500), now)


def sent(effects: list[Effect]) -> list[bytes]:
    return [e.data for e in effects if isinstance(e, SendDatagram)]


def limits_of(text: str):  # type: ignore[no-untyped-def]
    return dos_limits(parse_config(text))
