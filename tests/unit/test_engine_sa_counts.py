"""The SA table's counts (half-open, established, per peer, by identities) and its deadline
heap follow every change.

Admission before DH and the load reports read these counts once per IKE_SA_INIT,
and the ike service asks for the next deadline after every input; both are kept
incrementally (shared/ikev2/sa.py SaTable). Here many handshakes, deletes, rekeys
(also crossing ones), failures, half-open timeouts, dead peers and initial contacts
run through sans-I/O engines, and after every step the counts and the next deadline
must equal a recount by walking the table: the walk lives only in this test.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from ikefarm.shared.dos.admission import local_load
from ikefarm.shared.ikev2.effects import (
    Effect,
    Endpoint,
    InitialContact,
    KeystoreRequest,
    SendDatagram,
)
from ikefarm.shared.ikev2.engine import CHILD_SPI_SLACK, SA_TIMERS, IkeEngine
from ikefarm.shared.ikev2.policy import RetransmitPolicy, engine_policy
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState, SaTable
from tests.engine_helpers import INITIATOR_TOML, RESPONDER_TOML, config, keystore_stand_in

PSK = b"shared-secret-0123456789"
FAST = RetransmitPolicy(tries=2, timeout=1.0, base=2.0, jitter=0, limit=0)
LIFETIMES = """
[[ike.ike-policy-template]]
name = "short"
rekey-time = "300s"
dpd-delay = "30s"
[[ike.ike-policy-template.ike-proposal]]
aead-alg = "aes256-gcm-128"
prf-alg = "hmac-sha384"
dh-group = "x25519"
[[ike.ipsec-policy-template]]
name = "short"
rekey-time = "200s"
dpd-action = "clear"
[[ike.ipsec-policy-template.esp-proposal]]
aead-alg = "aes256-gcm-128"
"""
VPN = 'ike-policy = { template = "short" }\nipsec-policy = { template = "short" }'
HALF_OPEN = "[ike.session.half-open]\ntimeout = 20\n"


def recount(table: SaTable) -> dict[str, Any]:
    """What the table's counts must be, by walking it."""
    peers: Counter[str] = Counter()
    identities: dict[tuple[str, str], set[int]] = {}
    for sa in table.values():
        if sa.established_at is None and not sa.is_initiator:
            peers[sa.remote.address] += 1
        if sa.established_at is not None and sa.local_id and sa.remote_id:
            key = (str(sa.local_id), str(sa.remote_id))
            identities.setdefault(key, set()).add(sa.unique_id)
    return {
        "half_open": sum(1 for sa in table.values() if sa.established_at is None),
        "established": sum(1 for sa in table.values() if sa.state == IkeSaState.ESTABLISHED),
        "peers": peers,
        "identities": identities,
        "all_vpns": {id(sa.vpn): sa.vpn for sa in table.values() if sa.vpn is not None},
    }


def walked_deadline(engine: IkeEngine) -> float | None:
    """The next deadline by walking every SA (what next_deadline() did before the heap)."""
    deadlines = [
        sa.half_open_deadline
        for sa in engine.sas.values()
        if sa.half_open_deadline is not None and sa.established_at is None
    ]
    deadlines += [sa.outstanding.next_at for sa in engine.sas.values() if sa.outstanding]
    for sa in engine.sas.values():
        if sa.established_at is not None:
            deadlines += [d for timer in SA_TIMERS if (d := timer.deadline(sa)) is not None]
    return min(deadlines) if deadlines else None


def assert_counts(engine: IkeEngine) -> None:
    assert engine.next_deadline() == walked_deadline(engine)
    table = engine.sas
    truth = recount(table)
    load = local_load(engine)
    assert engine.half_open_count == truth["half_open"]
    assert engine.established_count == truth["established"]
    assert load.half_open == sum(truth["peers"].values())
    assert load.established == truth["established"]
    assert dict(load.peers) == dict(truth["peers"])
    for (local_id, remote_id), unique_ids in truth["identities"].items():
        found = {sa.unique_id for sa in table.established_between(local_id, remote_id)}
        assert found == unique_ids
    for key, vpn in truth["all_vpns"].items():
        established = any(
            sa.established_at is not None and id(sa.vpn) == key for sa in table.values()
        )
        assert table.has_established(vpn) == established
    for sa in table.values():
        assert sa.table is table
    # nothing is left over for SAs that are gone
    assert sum(len(table.established_between(*k)) for k in table._by_identities) == sum(
        len(v) for v in truth["identities"].values()
    )


class CheckedEngine(IkeEngine):
    """An engine that checks its table's counts after every input."""

    def receive(self, *args: Any, **kwargs: Any) -> list[Effect]:
        effects = super().receive(*args, **kwargs)
        assert_counts(self)
        return effects

    def keystore_reply(self, *args: Any, **kwargs: Any) -> list[Effect]:
        effects = super().keystore_reply(*args, **kwargs)
        assert_counts(self)
        return effects

    def on_timer(self, now: float) -> list[Effect]:
        effects = super().on_timer(now)
        assert_counts(self)
        return effects

    def initial_contact(self, *args: Any, **kwargs: Any) -> list[Effect]:
        effects = super().initial_contact(*args, **kwargs)
        assert_counts(self)
        return effects


@dataclass
class Node:
    engine: CheckedEngine
    address: str
    psk: bytes = PSK


@dataclass
class Net:
    """A responder and several initiators (one address each) on a lossless in-memory net;
    `lossy` addresses lose every datagram they send."""

    nodes: dict[str, Node]
    now: float = 1000.0
    lossy: set[str] = field(default_factory=set)

    def run(self, effects: list[Effect], source: Node, limit: int = 400) -> None:
        queue = [(source, e) for e in effects]
        while queue and limit:
            limit -= 1
            node, effect = queue.pop(0)
            if isinstance(effect, KeystoreRequest):
                reply = keystore_stand_in(node.psk, effect.request, effect.operation)
                out = node.engine.keystore_reply(effect.request_id, reply, self.now)
                queue += [(node, e) for e in out]
            elif isinstance(effect, InitialContact):  # the bus fan-out to every worker
                out = node.engine.initial_contact(
                    effect.local_id, effect.remote_id, effect.keep_ike_unique_id, self.now
                )
                queue += [(node, e) for e in out]
            elif isinstance(effect, SendDatagram) and node.address not in self.lossy:
                target = self.nodes.get(effect.remote.address)
                if target is None:
                    continue
                out = target.engine.receive(
                    effect.data,
                    Endpoint(effect.remote.address, effect.remote.port),
                    Endpoint(effect.local.address, effect.local.port),
                    self.now,
                )
                queue += [(target, e) for e in out]

    def tick(self, seconds: float) -> None:
        """Advance time, firing every node's timers as they come due."""
        until = self.now + seconds
        while True:
            due = [
                (d, n.address)
                for n in self.nodes.values()
                if (d := n.engine.next_deadline()) is not None and d <= until
            ]
            if not due:
                break
            when, address = min(due)
            self.now = max(self.now, when)
            node = self.nodes[address]
            self.run(node.engine.on_timer(self.now), node)
        self.now = until


def engine(text: str, shard: int, seed: int) -> CheckedEngine:
    rng = random.Random(seed)
    made = CheckedEngine(
        engine_policy(config(text, LIFETIMES + HALF_OPEN, VPN)),
        shard=shard,
        random=rng.randbytes,
        uniform=rng.uniform,
    )
    made.policy = type(made.policy)(**{**made.policy.__dict__, "retransmit": FAST})
    return made


def network(seed: int, peers: int = 3) -> Net:
    nodes = {"192.0.2.1": Node(engine(RESPONDER_TOML, 1, seed), "192.0.2.1")}
    for n in range(peers):
        address = f"192.0.2.{10 + n}"
        text = INITIATOR_TOML.replace("192.0.2.2", address)
        nodes[address] = Node(engine(text, 2 + n, seed * 100 + n), address)
    return Net(nodes)


def established(node: Node) -> list[IkeSa]:
    return [sa for sa in node.engine.sas.values() if sa.state == IkeSaState.ESTABLISHED]


@pytest.mark.parametrize("seed", range(4))
def test_counts_equal_a_recount_after_every_step(seed: int) -> None:
    net = network(seed)
    rng = random.Random(seed)
    responder = net.nodes["192.0.2.1"]
    initiators = [n for a, n in net.nodes.items() if a != "192.0.2.1"]
    seen: Counter[str] = Counter()
    for _step in range(60):
        node = rng.choice(initiators)
        action = rng.choice(
            [
                "handshake",
                "handshake",
                "wrong_psk",
                "half_open",
                "delete",
                "rekey_ike",
                "rekey_child",
                "crossing_rekey",
                "responder_delete",
                "restart",
                "wait",
                "dead_peer",
            ]
        )
        ours = established(node)
        theirs = established(responder)
        if action == "handshake":
            net.run(node.engine.initiate("hq", "net", net.now), node)
        elif action == "wrong_psk":  # IKE_AUTH fails: AUTHENTICATION_FAILED, both forget it
            node.psk = b"not-the-secret"
            net.run(node.engine.initiate("hq", "net", net.now), node)
            node.psk = PSK
        elif action == "half_open":  # IKE_SA_INIT answered, IKE_AUTH never arrives
            effects = node.engine.initiate("hq", "net", net.now)
            net.run(effects, node, limit=2)
            net.lossy.add(node.address)
            net.tick(5.0)
            net.lossy.discard(node.address)
        elif action == "delete" and ours:
            net.run(node.engine.delete_ike(rng.choice(ours), net.now), node)
        elif action == "responder_delete" and theirs:
            net.run(responder.engine.delete_ike(rng.choice(theirs), net.now), responder)
        elif action == "rekey_ike" and ours:
            net.run(node.engine.rekey_ike(rng.choice(ours), net.now), node)
        elif action == "rekey_child" and ours:
            sa = rng.choice(ours)
            if sa.children:
                net.run(node.engine.rekey_child(sa, sa.children[0], net.now), node)
        elif action == "crossing_rekey" and ours:
            mine = rng.choice(ours)
            peer = next((sa for sa in theirs if sa.spi_i == mine.spi_i), None)
            if peer is not None:
                net.lossy.update({node.address, responder.address})
                first = node.engine.rekey_ike(mine, net.now)
                second = responder.engine.rekey_ike(peer, net.now)
                net.lossy.clear()
                net.run(first, node)
                net.run(second, responder)
        elif action == "restart":  # the peer forgets its SAs: INITIAL_CONTACT clears ours
            index = initiators.index(node)
            fresh = Node(
                engine(
                    INITIATOR_TOML.replace("192.0.2.2", node.address),
                    20 + index,
                    rng.randrange(1 << 30),
                ),
                node.address,
            )
            net.nodes[node.address] = initiators[index] = fresh
            net.run(fresh.engine.initiate("hq", "net", net.now), fresh)
        elif action == "dead_peer" and ours:  # the peer goes silent: DPD and retransmits fail
            net.lossy.add(node.address)
            net.tick(60.0)
            net.lossy.discard(node.address)
        else:
            net.tick(rng.choice([1.0, 25.0, 120.0]))
        seen[action] += 1
        for each in net.nodes.values():
            assert_counts(each.engine)
    net.tick(2000.0)  # lifetimes: rekeys, expiries, half-open timeouts
    for each in net.nodes.values():
        assert_counts(each.engine)
    # the walk saw what the scenario claims: counts of every kind were exercised
    counters = responder.engine.counters
    assert counters["half_open_expired"] > 0 or seen["half_open"] == 0
    assert counters["ike_sa_established"] > 5


def test_a_table_refuses_changes_that_bypass_its_counts() -> None:
    table = SaTable()
    with pytest.raises(TypeError):
        table.update({})
    with pytest.raises(TypeError):
        table.clear()
    with pytest.raises(TypeError):
        table.setdefault(b"x" * 8, None)  # type: ignore[arg-type]


def test_removed_sa_leaves_no_count_and_can_join_another_table() -> None:
    net = network(7, peers=1)
    (node,) = [n for a, n in net.nodes.items() if a != "192.0.2.1"]
    net.run(node.engine.initiate("hq", "net", net.now), node)
    responder = net.nodes["192.0.2.1"].engine
    (sa,) = responder.sas.values()
    assert responder.established_count == 1 and responder.sas.has_established(sa.vpn)
    responder.sas.pop(sa.local_spi)
    assert sa.table is None
    assert responder.established_count == 0 and responder.half_open_count == 0
    assert not responder.sas.has_established(sa.vpn)
    assert list(responder.sas.established_between(str(sa.local_id), str(sa.remote_id))) == []
    other = SaTable()
    other[sa.local_spi] = sa
    assert other.established == 1
    sa.state = IkeSaState.DELETING  # a later change moves the other table's counts only
    assert other.established == 0 and responder.established_count == 0


def test_a_timer_tick_touches_only_the_sas_that_are_due() -> None:
    """With many SAs, next_deadline() and on_timer() recompute the deadlines of the SAs
    that changed or came due, not of every SA (the service asks after every input)."""
    net = network(11, peers=1)
    (node,) = [n for a, n in net.nodes.items() if a != "192.0.2.1"]
    responder = net.nodes["192.0.2.1"].engine
    for _ in range(30):
        net.run(node.engine.initiate("hq", "net", net.now), node)
        net.now += 1.0
    assert responder.established_count == 30
    computed: list[IkeSa] = []
    recompute = responder.sas._deadline
    assert recompute is not None

    def counting(sa: IkeSa) -> float | None:
        computed.append(sa)
        return recompute(sa)

    responder.sas._deadline = counting
    first = responder.next_deadline()
    assert first is not None and computed == []  # nothing changed: nothing recomputed
    (oldest,) = [sa for sa in responder.sas.values() if recompute(sa) == first]
    computed.clear()
    net.now = first
    responder.on_timer(net.now)  # the first SA's DPD check, say: only it is due
    responder.next_deadline()
    assert {id(sa) for sa in computed} == {id(oldest)}
    # a datagram for one SA recomputes that SA only
    computed.clear()
    other = next(sa for sa in responder.sas.values() if sa is not oldest)
    responder.delete_ike(other, net.now)
    responder.next_deadline()
    assert {id(sa) for sa in computed} == {id(other)}


def test_child_spis_are_unique_without_a_walk_per_child() -> None:
    """new_child_spi never returns an SPI a child has, and its memory of handed-out SPIs
    stays bounded (rebuilt from the children now and then, not walked per child)."""
    net = network(12, peers=1)
    (node,) = [n for a, n in net.nodes.items() if a != "192.0.2.1"]
    net.run(node.engine.initiate("hq", "net", net.now), node)
    responder = net.nodes["192.0.2.1"].engine
    (sa,) = responder.sas.values()
    (child,) = sa.children
    fresh = (n.to_bytes(4, "big") for n in itertools.count(1000))
    draws = [b"\x00\x00\x00\x07", child.spi_in]  # reserved, then the child's own SPI

    def source(size: int) -> bytes:
        return draws.pop(0) if draws else next(fresh)

    responder.random = source
    assert responder.new_child_spi() == (1000).to_bytes(4, "big")
    handed = {responder.new_child_spi() for _ in range(5000)}
    assert len(handed) == 5000 and child.spi_in not in handed
    assert len(responder._child_spis) <= 2 * 1 + CHILD_SPI_SLACK + 1  # rebuilt: bounded
    draws[:] = [child.spi_in]  # after the rebuilds the live child's SPI is still refused
    assert responder.new_child_spi() != child.spi_in


def test_times_the_timers_would_skip_do_not_keep_them_due() -> None:
    """An SA being deleted (or a child already going) does not act on its lifetimes: those
    times are no deadline, else next_deadline() stays in the past and the worker's
    timer loop spins until the Delete completes."""
    net = network(13, peers=1)
    (node,) = [n for a, n in net.nodes.items() if a != "192.0.2.1"]
    net.run(node.engine.initiate("hq", "net", net.now), node)
    engine = node.engine
    (sa,) = engine.sas.values()
    (child,) = sa.children
    net.lossy.add(node.address)  # the Delete is never answered
    net.run(engine.delete_ike(sa, net.now), node)
    assert sa.state == IkeSaState.DELETING and sa.outstanding is not None
    sa.expire_at = net.now - 1.0
    child.expire_at = net.now - 1.0
    due = engine.next_deadline()
    assert due == sa.outstanding.next_at and due > net.now
    assert engine.on_timer(net.now) == []
    assert engine.next_deadline() == due
