"""RADIUS accounting of IKE SAs, the ike worker's side (services/ike/radius_accounting.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from ikefarm.proto.messages import RadiusAccounting
from ikefarm.services.ike.radius_accounting import Accounting, terminate_cause
from ikefarm.shared.ikev2.effects import SaEvent


def child(unique_id: int, octets: int) -> SimpleNamespace:
    return SimpleNamespace(
        unique_id=unique_id, bytes_in=octets, bytes_out=2 * octets, packets_in=1, packets_out=2
    )


async def test_start_rekey_interim_and_stop_of_one_session() -> None:
    sent: list[RadiusAccounting] = []

    async def send(message: RadiusAccounting) -> None:
        sent.append(message)

    now = [100.0]
    accounting = Accounting({"rw"}, 0.0, send, Counter(), clock=lambda: now[0])
    first = SimpleNamespace(children=[child(7, 10)])
    second = SimpleNamespace(children=[child(8, 5)])
    sas = {1: first, 2: second}
    lookup = lambda event: sas.get(event.ike_unique_id)  # noqa: E731
    detail = {"spi_i": "aa", "spi_r": "bb", "remote_id": "alice.peer.example",
              "eap_identity": "alice", "remote": "192.0.2.2", "local": "192.0.2.1",
              "remote_vips": ["10.9.0.42"]}  # fmt: skip
    accounting.observe(SaEvent("ike-established", 1, "rw", detail), lookup)
    accounting.observe(SaEvent("ike-established", 3, "other", detail), lookup)  # not accounted
    await asyncio.sleep(0)
    now[0] = 130.0
    # an IKE rekey: the session moves to the new SA (child 7 counts as seen at the Start)
    accounting.observe(SaEvent("ike-rekeyed", 2, "rw", {"old": 1, "new": 2}), lookup)
    accounting.observe(SaEvent("ike-deleted", 1, "rw", {"reason": "rekeyed"}), lookup)
    assert accounting.interim_updates() == 1
    await asyncio.sleep(0)
    second.children = [child(9, 1)]  # child 8 rekeyed: its last seen counts stay
    now[0] = 161.0
    accounting.observe(SaEvent("ike-deleted", 2, "rw", {"reason": "deleted by peer"}), lookup)
    await asyncio.sleep(0)
    assert [m.status for m in sent] == ["start", "interim", "stop"]
    start, interim, stop = sent
    assert start.session == stop.session == "aa-bb" and start.identity == "alice"
    assert start.framed_addresses == ["10.9.0.42"]
    assert interim.input_octets == 15 and interim.session_time == 30
    assert stop.input_octets == 16 and stop.output_octets == 32 and stop.session_time == 61
    assert stop.terminate_cause == "user-request" and accounting.sessions == {}


def test_terminate_causes() -> None:
    assert terminate_cause("deleted by peer") == "user-request"
    assert terminate_cause("peer not responding") == "lost-carrier"
    assert terminate_cause("something else") == "nas-request"
