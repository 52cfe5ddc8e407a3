"""How many bus messages one handshake costs, counted on a real nats-server with the real
ingress, ike worker, keystore and kernel services (the initiator is our own engine on
loopback, as in test_ike_churn). `docs/architecture.md` lists the same counts.

The load reports (`ike.load`, `ingress.load`) are left out of the exact counts: they are
sent on change and coalesced (at most every 20 ms per worker, every 50 ms per ingress), so
how many fall within one handshake depends on time, not on the design. So are the SA
snapshot writes (docs/failover.md): a worker seals its dirty SAs' secrets in one keystore
request per flush (every 2 s, for every SA changed since), asking the keystore's transport key
the first time; whether a flush falls within the handshake depends on time too.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import pytest
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Datagram
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import subscriptions_in_place
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.dos_helpers import init_requests
from tests.service.test_ike_churn import LOOPBACK, Farm, farm  # noqa: F401 (the fixture)
from tests.service.test_ingress_service import wait_until

pytestmark = pytest.mark.timeout(60)

LOAD_REPORTS = {subjects.IKE_LOAD, subjects.INGRESS_LOAD}
# requests of the periodic snapshot flush, each answered once
SNAPSHOT_FLUSH = {subjects.KEYSTORE_SA_SEAL, subjects.KEYSTORE_TRANSPORT_KEY}


def without_snapshot_flush(seen: list[str]) -> Counter[str]:
    counts = Counter(seen)
    for subject in SNAPSHOT_FLUSH:
        counts["reply"] -= counts.pop(subject, 0)
    return +counts


async def test_one_handshake_costs_the_messages_the_design_says(
    farm: Farm,  # noqa: F811
    nats_server: EmbeddedNats,
) -> None:
    nc = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def take(msg: Msg) -> None:
        if msg.subject not in LOAD_REPORTS and not msg.subject.startswith("$"):
            seen.append("reply" if msg.subject.startswith("_INBOX") else msg.subject)

    await nc.subscribe(">", cb=take)
    await subscriptions_in_place(nc)
    await asyncio.sleep(0.2)
    seen.clear()  # the subscription's own check
    peer = farm.peer

    def established() -> bool:
        return any(sa.state == IkeSaState.ESTABLISHED for sa in peer.engine.sas.values())

    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.initiate("hq", "net", now), now)
    await wait_until(established)
    await wait_until(lambda: subjects.IKE_INITIAL_CONTACT in seen)
    await nc.close()
    auth_starts = seen.index(subjects.ike_shard(1))  # the IKE_AUTH request
    assert without_snapshot_flush(seen[:auth_starts]) == {
        subjects.IKE_INIT: 1,  # the IKE_SA_INIT request, its header read (Datagram)
        "ikefarm.ingress.send.ingress-0": 1,  # the answer and its init route, together
    }, seen
    assert farm.ingress.counters["init_route_learned"] == 1
    assert without_snapshot_flush(seen[auth_starts:]) == {
        subjects.ike_shard(1): 1,  # IKE_AUTH request
        subjects.KEYSTORE_PSK_AUTH: 1,  # AUTH computed where the PSK is
        subjects.KERNEL_CHILD_INSTALL: 1,  # the child SA before the answer
        # the worker's first child only: the kernel service's key its ESP keys are sealed to
        subjects.KERNEL_TRANSPORT_KEY: 1,
        "reply": 3,  # keystore, transport key and kernel answers
        subjects.INGRESS_SEND: 1,  # IKE_AUTH response
        subjects.EVENT_IKE_SA: 1,
        subjects.EVENT_CHILD_SA: 1,
        subjects.IKE_INITIAL_CONTACT: 1,  # the initiator sent INITIAL_CONTACT (RFC 7296 2.4)
    }, seen


async def test_an_older_ingress_gets_the_answer_and_the_route_apart(
    farm: Farm,  # noqa: F811
    nats_server: EmbeddedNats,
) -> None:
    """A Datagram without `answer_direct` (an ingress from before it): the worker answers on
    the queue group and broadcasts the init route, as it did then."""
    nc = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def take(msg: Msg) -> None:
        if msg.subject.startswith("ikefarm.ingress."):
            seen.append(msg.subject)

    await nc.subscribe(">", cb=take)
    await subscriptions_in_place(nc)
    await asyncio.sleep(0.2)
    seen.clear()
    (request,) = init_requests(1)
    datagram = Datagram(LOOPBACK, 500, LOOPBACK, 40000, request, via="old-ingress")
    await nc.publish(subjects.IKE_INIT, envelope.pack(datagram))
    await wait_until(lambda: len(seen) >= 2)
    await asyncio.sleep(0.2)
    await nc.close()
    assert sorted(s for s in seen if s != subjects.INGRESS_LOAD) == [
        subjects.INGRESS_INIT_ROUTE,
        subjects.INGRESS_SEND,
    ], seen
