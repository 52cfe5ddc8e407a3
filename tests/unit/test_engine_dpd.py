"""DPD (seed 004) and NAT-T keepalives (RFC 3948 2.3) between two engines in memory."""

from __future__ import annotations

from typing import Any

import pytest

from ikefarm.shared.ikev2.effects import (
    Effect,
    Endpoint,
    InstallChildSa,
    InstallTrap,
    KeystoreRequest,
    Log,
    SendDatagram,
    SendKeepalive,
)
from ikefarm.shared.ikev2.exchanges import dpd, nat_keepalive
from ikefarm.shared.ikev2.policy import RetransmitPolicy
from ikefarm.shared.ikev2.retransmit import total_timeout
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import Side, Wire, keystore_stand_in, pair

FAST = RetransmitPolicy(tries=3, timeout=1.0, base=2.0, jitter=0, limit=0)  # dead after 15 s


def dpd_pair(action: str = "restart", delay: str = "10s", responder_action: str = "clear") -> Wire:
    vpn = f'ike-policy = {{ dpd-delay = "{delay}" }}\nipsec-policy = {{ template = "p" }}'
    wire = pair(
        f'[[ike.ipsec-policy-template]]\nname = "p"\ndpd-action = "{responder_action}"\n',
        f'[[ike.ipsec-policy-template]]\nname = "p"\ndpd-action = "{action}"\n',
        responder_vpn=vpn,
        initiator_vpn=vpn,
    )
    for side in (wire.initiator, wire.responder):
        policy = side.engine.policy
        side.engine.policy = type(policy)(**{**policy.__dict__, "retransmit": FAST})
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    return wire


def tick(wire: Wire, side: Side, until: float, *, deliver: bool = True) -> list[Effect]:
    """Advance `side`'s timers to `until`; its datagrams reach the peer only if `deliver`."""
    out: list[Effect] = []
    while True:
        deadline = side.engine.next_deadline()
        if deadline is None or deadline > until:
            break
        wire.now = max(wire.now, deadline)
        effects = side.engine.on_timer(wire.now)
        out += effects
        wire.run(effects, side, drop=None if deliver else (lambda _s, _e: True))
    wire.now = until
    return out


def test_dpd_delay_zero_disables_liveness_checks() -> None:
    wire = dpd_pair(delay="0s")
    (sa,) = wire.initiator.engine.sas.values()
    assert dpd.deadline(sa) is None


def test_an_idle_sa_is_checked_after_dpd_delay_and_the_answer_keeps_it() -> None:
    wire = dpd_pair()
    (sa,) = wire.initiator.engine.sas.values()
    start = wire.now
    assert dpd.deadline(sa) == start + 10
    out = tick(wire, wire.initiator, start + 9.9)
    assert out == []
    out = tick(wire, wire.initiator, start + 10)
    assert [e.event for e in out if isinstance(e, Log)] == ["dpd_check_sent"]
    assert wire.initiator.engine.counters["liveness_confirmed"] == 1
    assert sa.last_seen == start + 10 and dpd.deadline(sa) == start + 20


def test_protected_traffic_from_the_peer_postpones_the_check() -> None:
    wire = dpd_pair()
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    start = wire.now
    # the responder's own check at +10 is proof of liveness for the initiator
    tick(wire, wire.responder, start + 10)
    assert i_sa.last_seen == start + 10 and dpd.deadline(i_sa) == start + 20
    assert wire.initiator.engine.counters["dpd_checks"] == 0
    # child traffic reported by the kernel counts too (RFC 3706 / seed 004)
    assert dpd.traffic_seen(wire.initiator.engine, i_sa.children[0].unique_id, start + 15)
    assert dpd.deadline(i_sa) == start + 25
    assert not dpd.traffic_seen(wire.initiator.engine, 999_999, start + 15)
    assert r_sa.state == IkeSaState.ESTABLISHED


def _dead_peer(wire: Wire) -> tuple[float, list[Effect]]:
    """The responder stops answering; returns when the initiator sent its check, and effects."""
    start = wire.now
    out = tick(wire, wire.initiator, start + 10, deliver=False)
    assert wire.initiator.engine.counters["dpd_checks"] == 1
    sent_at = start + 10
    out += tick(wire, wire.initiator, sent_at + total_timeout(FAST) - 0.001, deliver=False)
    assert wire.initiator.engine.counters["dpd_peer_dead"] == 0
    out += tick(wire, wire.initiator, sent_at + total_timeout(FAST), deliver=False)
    assert wire.initiator.engine.counters["dpd_peer_dead"] == 1
    return sent_at, out


def test_clear_removes_the_sa_and_its_children_after_the_total_retransmit_time() -> None:
    wire = dpd_pair("clear")
    (sa,) = wire.initiator.engine.sas.values()
    _sent_at, out = _dead_peer(wire)
    assert wire.initiator.engine.sas == {}
    assert wire.initiator.engine.counters["retransmits"] == FAST.tries
    (dead,) = [e for e in out if isinstance(e, Log) and e.event == "peer_dead"]
    assert dead.level == 0 and dead.fields["actions"] == {"net": "clear"}
    assert not [e for e in out if isinstance(e, InstallTrap | KeystoreRequest)]
    assert sa.state == IkeSaState.DELETED


def test_trap_installs_the_childs_trap_policy() -> None:
    wire = dpd_pair("trap")
    (sa,) = wire.initiator.engine.sas.values()
    (child,) = sa.children
    _sent_at, out = _dead_peer(wire)
    (trap,) = [e for e in out if isinstance(e, InstallTrap)]
    assert (trap.vpn, trap.name, trap.reqid) == ("hq", "net", child.policy.reqid)
    assert trap.local_ts == ("10.200.0.0/24",) and trap.remote_ts == ("10.100.0.0/24",)
    assert (trap.local, trap.remote) == ("192.0.2.2", "192.0.2.1")
    assert wire.initiator.engine.sas == {}


def test_restart_initiates_again_at_once_and_re_establishes_when_the_peer_answers() -> None:
    wire = dpd_pair("restart")
    (old,) = wire.initiator.engine.sas.values()
    _sent_at, out = _dead_peer(wire)
    (new,) = wire.initiator.engine.sas.values()
    assert new.unique_id != old.unique_id and new.state == IkeSaState.CONNECTING
    assert new.remote == Endpoint("192.0.2.1", 500) and new.requested_child is not None
    sent = [e for e in out if isinstance(e, SendDatagram) and e.exchange == "IKE_SA_INIT"]
    assert len(sent) == 1
    # the peer is back: the retransmitted IKE_SA_INIT gets through
    tick(wire, wire.initiator, wire.now + 5)
    assert new.state == IkeSaState.ESTABLISHED and [c.name for c in new.children] == ["net"]
    responder_sas = [s for s in wire.responder.engine.sas.values() if s.spi_i == new.spi_i]
    assert responder_sas and responder_sas[0].state == IkeSaState.ESTABLISHED


def test_restart_of_an_sa_the_peer_initiated_goes_back_to_the_peers_address() -> None:
    # the responder's VPN accepts any remote address: a restart initiates to where the peer was
    wire = dpd_pair(action="clear", responder_action="restart")
    (r_old,) = wire.responder.engine.sas.values()
    start = wire.now
    tick(wire, wire.responder, start + 10, deliver=False)
    tick(wire, wire.responder, start + 10 + total_timeout(FAST), deliver=False)
    (r_new,) = wire.responder.engine.sas.values()
    assert r_new.is_initiator and r_new.unique_id != r_old.unique_id
    assert r_new.remote == Endpoint("192.0.2.2", 500)
    assert r_new.vpn is not None and r_new.vpn.remote_id == "peer.example"
    tick(wire, wire.responder, wire.now + 2)
    assert r_new.state == IkeSaState.ESTABLISHED and [c.name for c in r_new.children] == ["net"]


def test_a_busy_window_defers_the_check_to_the_requests_own_retransmissions() -> None:
    wire = dpd_pair()
    (sa,) = wire.initiator.engine.sas.values()
    (child,) = sa.children
    wire.initiator.engine.delete_child(sa, child, wire.now)  # never delivered
    assert sa.outstanding is not None and dpd.deadline(sa) is None


# -- NAT-T ----------------------------------------------------------------------------------------


class NatWire(Wire):
    """The initiator sits behind a NAT that maps it to PUBLIC, port + 10000."""

    PUBLIC = "198.51.100.9"

    def run(
        self, effects: list[Effect], source: Side, *, drop: Any = None, limit: int = 200
    ) -> None:
        queue = [(source, e) for e in effects]
        steps = 0
        while queue and steps < limit:
            steps += 1
            side, effect = queue.pop(0)
            side.effects.append(effect)
            if isinstance(effect, KeystoreRequest):
                reply = keystore_stand_in(side.psk, effect.request)
                queue += [
                    (side, e)
                    for e in side.engine.keystore_reply(effect.request_id, reply, self.now)
                ]
            elif isinstance(effect, SendDatagram):
                if drop is not None and drop(side, effect):
                    continue
                if side is self.initiator:
                    target = self.responder
                    to = effect.remote
                    seen = Endpoint(self.PUBLIC, effect.local.port + 10000)
                else:
                    target = self.initiator
                    to = Endpoint(self.initiator.address, effect.remote.port - 10000)
                    seen = effect.local
                out = target.engine.receive(effect.data, to, seen, self.now)
                queue += [(target, e) for e in out]


def nat_pair() -> NatWire:
    plain = pair()
    return NatWire(plain.initiator, plain.responder)


def test_nat_detected_both_float_to_4500_and_children_are_udp_encapsulated() -> None:
    wire = nat_pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    assert (i_sa.nat_local, i_sa.nat_remote) == (True, False)
    assert (r_sa.nat_local, r_sa.nat_remote) == (False, True)
    assert i_sa.local.port == 4500 and i_sa.remote.port == 4500
    assert r_sa.local.port == 4500 and r_sa.remote == Endpoint(NatWire.PUBLIC, 14500)
    for side in (wire.initiator, wire.responder):
        (install,) = [e.child for e in side.effects if isinstance(e, InstallChildSa)]
        assert install.udp_encap and install.local.port == 4500
    (r_install,) = [e.child for e in wire.responder.effects if isinstance(e, InstallChildSa)]
    assert r_install.remote == Endpoint(NatWire.PUBLIC, 14500)


def test_only_the_side_behind_the_nat_sends_keepalives_every_20_seconds() -> None:
    wire = nat_pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    start = wire.now
    assert nat_keepalive.deadline(i_sa) == start + nat_keepalive.INTERVAL
    assert nat_keepalive.deadline(r_sa) is None
    out = tick(wire, wire.initiator, start + 65)
    keepalives = [e for e in out if isinstance(e, SendKeepalive)]
    assert (
        keepalives == [SendKeepalive(Endpoint("192.0.2.2", 4500), Endpoint("192.0.2.1", 4500))] * 3
    )
    assert wire.initiator.engine.counters["nat_keepalives_sent"] == 3
    assert not [e for e in tick(wire, wire.responder, start + 65) if isinstance(e, SendKeepalive)]


@pytest.mark.parametrize("state", [IkeSaState.DELETING, IkeSaState.CONNECTING])
def test_no_keepalive_outside_an_established_sa(state: IkeSaState) -> None:
    wire = nat_pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    i_sa.state = state
    assert nat_keepalive.deadline(i_sa) is None
