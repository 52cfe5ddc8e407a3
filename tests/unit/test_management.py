"""Manual SA control on an engine (seed 004 initiate/rekey/reauth/flush, seed 002 clear sa)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ikefarm.shared.ikev2 import management
from ikefarm.shared.ikev2.effects import ChildFailed, Effect, Log, SaEvent, SaFailed
from ikefarm.shared.ikev2.management import Command, CommandError, Watches, parse_words
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa, IkeSaState
from tests.engine_helpers import Side, Wire, pair

SECOND_POLICY_I = """
[[ike.vpn.security-policy]]
name = "net2"
local-ts = { subnet = "10.201.0.0/24" }
remote-ts = { subnet = "10.101.0.0/24" }
"""
SECOND_POLICY_R = """
[[ike.vpn.security-policy]]
name = "net2"
local-ts = { subnet = "10.101.0.0/24" }
remote-ts = { subnet = "10.201.0.0/24" }
"""
# a second VPN between the same gateways, with identities of its own
SECOND_VPN_I = """
[[ike.pre-shared-key]]
local-id = "peer2.example"
remote-id = "gw.example"
secret = "shared-secret-0123456789"

[[ike.vpn]]
name = "hq2"
local-address = "192.0.2.2"
remote-address = "192.0.2.1"
local-id = "peer2.example"
remote-id = "gw.example"
[[ike.vpn.security-policy]]
name = "lab"
local-ts = { subnet = "10.202.0.0/24" }
remote-ts = { subnet = "10.102.0.0/24" }
"""
SECOND_VPN_R = """
[[ike.pre-shared-key]]
local-id = "gw.example"
remote-id = "peer2.example"
secret = "shared-secret-0123456789"

[[ike.vpn]]
name = "rw2"
local-address = "192.0.2.1"
local-id = "gw.example"
remote-id = "peer2.example"
[[ike.vpn.security-policy]]
name = "lab"
local-ts = { subnet = "10.102.0.0/24" }
remote-ts = { subnet = "10.202.0.0/24" }
"""


def run(wire: Wire, side: Side, command: str) -> management.Outcome:
    verb, *words = command.split()
    outcome = management.execute(side.engine, parse_words(verb, words), wire.now)
    wire.run(outcome.effects, side)
    return outcome


def farm() -> Wire:
    """hq (children net, net2) and hq2 (child lab), all established from the initiator."""
    wire = pair(SECOND_POLICY_R + SECOND_VPN_R, SECOND_POLICY_I + SECOND_VPN_I)
    for words in ("child-sa security-policy net", "child-sa security-policy net2"):
        assert run(wire, wire.initiator, f"initiate {words}").ok
    assert run(wire, wire.initiator, "initiate child-sa security-policy lab").ok
    return wire


def summary(side: Side) -> dict[str, list[str]]:
    return {
        f"{sa.vpn.name if sa.vpn else '-'}:{sa.state}": sorted(c.name for c in sa.children)
        for sa in side.engine.sas.values()
    }


def by_vpn(side: Side, name: str) -> IkeSa:
    (sa,) = [s for s in side.engine.sas.values() if s.vpn and s.vpn.name == name]
    return sa


# -- grammar --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("initiate child-sa security-policy trunk",
         Command("initiate", "child-sa", "security-policy", "trunk")),
        ("initiate ike-sa vpn vpn-hq", Command("initiate", "ike-sa", "vpn", "vpn-hq")),
        ("rekey ike-sa unique-id 4", Command("rekey", "ike-sa", "unique-id", "4")),
        ("rekey child-sa security-policy trunk",
         Command("rekey", "child-sa", "security-policy", "trunk")),
        ("reauth ike-sa vpn vpn-hq", Command("reauth", "ike-sa", "vpn", "vpn-hq")),
        ("flush child-sa unique-id 6", Command("flush", "child-sa", "unique-id", "6")),
        ("clear sa all", Command("clear", "sa", "all")),
        ("clear sa all phase 2", Command("clear", "sa", "all", "", 2)),
        ("clear sa tunnel ipsec:Aottawa2boca phase 2",
         Command("clear", "sa", "tunnel", "ipsec:Aottawa2boca", 2)),
        ("clear sa state established phase 1",
         Command("clear", "sa", "state", "established", 1)),
    ],
)  # fmt: skip
def test_the_seed_command_lines_parse(line: str, command: Command) -> None:
    verb, *words = line.split()
    assert parse_words(verb, words) == command
    assert command.words() == line


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("initiate ike-sa unique-id 3", "usage: initiate"),
        ("rekey ike-sa unique-id four", "unique-id must be a number"),
        ("rekey ike-sa vpn", "usage: rekey"),
        ("reauth child-sa security-policy x", "usage: reauth"),
        ("flush ike-sa vpn a b", "usage: flush"),
        ("clear sa all phase 3", "phase is 1"),
        ("clear sa all extra", "usage: clear"),
        ("clear sa tunnel", "usage: clear"),
        ("clear sa state bogus", "unknown state 'bogus'"),
        ("clear sa state installed phase 1", "unknown state 'installed'"),
        ("flush ike-sa vpn x phase 1", "usage: flush"),
        ("delete ike-sa vpn x", "unknown command"),
    ],
)
def test_wrong_words_say_what_is_expected(line: str, message: str) -> None:
    verb, *words = line.split()
    with pytest.raises(CommandError, match=message):
        parse_words(verb, words)


def test_anything_from_the_bus_is_checked_before_it_runs() -> None:
    wire = pair()
    for command in (
        Command("rekey", "ike-sa", "unique-id", "1e9"),
        Command("flush", "sa", "all"),
        Command("clear", "sa", "all", "x" * 300),
        Command("rekey", "ike-sa", "vpn", "hq", 2),
    ):
        outcome = management.execute(wire.initiator.engine, command, wire.now)
        assert not outcome.ok and outcome.error and outcome.effects == []


# -- selection errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("flush ike-sa vpn nope", "no vpn named 'nope' (configured: hq, hq2)"),
        ("flush child-sa security-policy nope", "no security-policy named 'nope' (configured:"),
        ("initiate ike-sa vpn nope", "no vpn named 'nope'"),
        ("clear sa tunnel nope", "no vpn named 'nope'"),
    ],
)
def test_unknown_names_are_refused_clearly(line: str, message: str) -> None:
    wire = farm()
    before = summary(wire.initiator)
    verb, *words = line.split()
    outcome = management.execute(wire.initiator.engine, parse_words(verb, words), wire.now)
    assert not outcome.ok and outcome.error.startswith(message)
    assert summary(wire.initiator) == before


def test_an_unknown_unique_id_matches_nothing() -> None:
    wire = farm()
    outcome = run(wire, wire.initiator, "flush ike-sa unique-id 999")
    assert outcome.ok and outcome.count == 0 and outcome.lines == []


def test_a_vpn_that_cannot_initiate_says_why() -> None:
    wire = pair()
    outcome = run(wire, wire.responder, "initiate ike-sa vpn rw")
    assert not outcome.ok and "remote-address" in outcome.error


# -- initiate -------------------------------------------------------------------------------------


def watched(wire: Wire, line: str) -> tuple[management.Outcome, management.Watch]:
    verb, *words = line.split()
    command = parse_words(verb, words)
    watches = Watches()
    outcome = management.execute(wire.initiator.engine, command, wire.now)
    watch = management.watch_for(outcome, command)
    assert watch is not None
    watches.add(watch)
    start = len(wire.initiator.effects)
    wire.run(outcome.effects, wire.initiator)
    # the service feeds each batch; one batch with everything is the same here
    done = watches.observe(wire.initiator.engine, wire.initiator.effects[start:], wire.now)
    assert done == [watch] and watches.active == []
    return outcome, watch


def test_initiate_child_sa_prints_what_the_seed_prints() -> None:
    wire = pair()
    outcome, watch = watched(wire, "initiate child-sa security-policy net")
    sa = by_vpn(wire.initiator, "hq")
    (child,) = sa.children
    assert outcome.lines == [f"initiating IKE_SA hq[{sa.unique_id}] to 192.0.2.1"]
    assert watch.ok
    assert watch.lines == [
        "authentication of 'peer.example' (myself) with pre-shared key",
        "authentication of 'gw.example' with pre-shared key successful",
        f"IKE_SA hq[{sa.unique_id}] established between "
        "192.0.2.2[peer.example]...192.0.2.1[gw.example]",
        f"scheduling rekeying in {round(sa.rekey_at - wire.now)}s",
        f"maximum IKE_SA lifetime {round(sa.expire_at - wire.now)}s",
        f"CHILD_SA net{{{child.unique_id}}} established with SPIs {child.spi_in.hex()}_i "
        f"{child.spi_out.hex()}_o and TS 10.200.0.0/24 === 10.100.0.0/24",
    ]


def test_initiate_ike_sa_is_childless_when_the_peer_supports_it() -> None:
    wire = pair()
    _outcome, watch = watched(wire, "initiate ike-sa vpn hq")
    sa = by_vpn(wire.initiator, "hq")
    assert watch.ok and sa.peer_childless and sa.children == []
    assert not any(line.startswith("CHILD_SA") for line in watch.lines)
    assert by_vpn(wire.responder, "rw").children == []


def test_initiate_child_sa_uses_the_established_ike_sa() -> None:
    wire = pair(SECOND_POLICY_R, SECOND_POLICY_I)
    watched(wire, "initiate ike-sa vpn hq")
    sa = by_vpn(wire.initiator, "hq")
    outcome, watch = watched(wire, "initiate child-sa security-policy net2")
    assert outcome.on_existing and outcome.ike_unique_id == sa.unique_id
    assert outcome.lines == [f"establishing CHILD_SA net2 in IKE_SA hq[{sa.unique_id}]"]
    assert watch.ok and [c.name for c in sa.children] == ["net2"]
    assert len(wire.initiator.engine.sas) == 1
    assert watch.lines[0].startswith("CHILD_SA net2{")


def test_an_initiation_the_peer_never_answers_ends_failed() -> None:
    wire = pair()
    engine = wire.initiator.engine
    command = parse_words("initiate", ["ike-sa", "vpn", "hq"])
    outcome = management.execute(engine, command, wire.now)
    watch = management.watch_for(outcome, command)
    assert watch is not None
    watches = Watches()
    watches.add(watch)
    finished: list[management.Watch] = []
    while engine.sas:
        deadline = engine.next_deadline()
        assert deadline is not None
        finished += watches.observe(engine, engine.on_timer(deadline), deadline)
    assert finished == [watch] and not watch.ok
    assert watch.lines == [
        f"establishing IKE_SA hq[{outcome.ike_unique_id}] failed: peer not responding"
    ]


def test_an_initiation_refused_by_the_peer_says_why() -> None:
    wire = pair(initiator_psk=b"wrong-secret-0000000000")
    _outcome, watch = watched(wire, "initiate ike-sa vpn hq")
    assert not watch.ok and watch.lines[-1].endswith("failed: rejected_by_peer")


def test_a_refused_first_child_fails_the_initiation_but_keeps_the_ike_sa() -> None:
    wire = pair()
    policy = wire.initiator.engine.policy
    vpn = policy.vpns[0]
    sp = replace(
        vpn.security_policies[0],
        remote_ts=replace(vpn.security_policies[0].remote_ts, subnet="10.99.0.0/24"),
    )
    wire.initiator.engine.policy = replace(policy, vpns=(replace(vpn, security_policies=(sp,)),))
    _outcome, watch = watched(wire, "initiate child-sa security-policy net")
    assert not watch.ok
    assert watch.lines[-1] == "establishing CHILD_SA net failed: TS_UNACCEPTABLE"
    assert by_vpn(wire.initiator, "hq").state == IkeSaState.ESTABLISHED


def test_the_outcome_comes_from_typed_failures_not_from_log_event_names() -> None:
    """A log line named like a failure changes nothing; SaFailed/ChildFailed decide."""
    wire = pair()
    command = parse_words("initiate", ["child-sa", "security-policy", "net"])
    outcome = management.execute(wire.initiator.engine, command, wire.now)
    watch = management.watch_for(outcome, command)
    assert watch is not None and outcome.ike_unique_id is not None
    uid = outcome.ike_unique_id
    watches = Watches()
    watches.add(watch)
    engine = wire.initiator.engine
    lookalikes: list[Effect] = [
        Log(1, "ike", "authentication_failed", {"unique_id": uid, "reason": "log-only"}),
        Log(1, "child", "child_sa_refused", {"policy": "net", "notify": "LOG_ONLY"}),
    ]
    assert watches.observe(engine, lookalikes, wire.now) == []
    assert watch.reason == "" and watch.child_failed == ""
    (sa,) = engine.sas.values()
    failed: list[Effect] = [ChildFailed(uid, "net", "TS_UNACCEPTABLE"), SaFailed(uid, "typed")]
    failed += engine.remove_sa(sa, "test", wire.now)
    assert watches.observe(engine, failed, wire.now) == [watch]
    assert watch.lines == [f"establishing IKE_SA hq[{uid}] failed: typed"]


# -- flush and clear: exactly what they name -----------------------------------------------------


def test_flush_child_sa_by_policy_closes_only_those_children_on_both_sides() -> None:
    wire = farm()
    net = next(c for c in by_vpn(wire.initiator, "hq").children if c.name == "net")
    outcome = run(wire, wire.initiator, "flush child-sa security-policy net")
    assert outcome.count == 1 and outcome.pending_child == [
        (by_vpn(wire.initiator, "hq").unique_id, net.unique_id)
    ]
    assert outcome.lines == [
        f"closing CHILD_SA net{{{net.unique_id}}} with SPIs {net.spi_in.hex()}_i (0 bytes) "
        f"{net.spi_out.hex()}_o (0 bytes) and TS 10.200.0.0/24 === 10.100.0.0/24"
    ]
    expected_i = {"hq:established": ["net2"], "hq2:established": ["lab"]}
    assert summary(wire.initiator) == expected_i
    assert summary(wire.responder) == {"rw:established": ["net2"], "rw2:established": ["lab"]}


def test_flush_ike_sa_by_unique_id_deletes_that_one_only() -> None:
    wire = farm()
    hq = by_vpn(wire.initiator, "hq")
    outcome = run(wire, wire.initiator, f"flush ike-sa unique-id {hq.unique_id}")
    assert outcome.count == 1 and outcome.pending_ike == [hq.unique_id]
    assert outcome.lines == [
        f"deleting IKE_SA hq[{hq.unique_id}] between "
        "192.0.2.2[peer.example]...192.0.2.1[gw.example]"
    ]
    assert summary(wire.initiator) == {"hq2:established": ["lab"]}
    assert summary(wire.responder) == {"rw2:established": ["lab"]}


def test_flush_by_vpn_on_the_responder_side() -> None:
    wire = farm()
    outcome = run(wire, wire.responder, "flush ike-sa vpn rw2")
    assert outcome.count == 1
    assert summary(wire.initiator) == {"hq:established": ["net", "net2"]}


def test_clear_sa_all_phase_2_closes_every_child_and_keeps_the_ike_sas() -> None:
    wire = farm()
    outcome = run(wire, wire.initiator, "clear sa all phase 2")
    assert outcome.count == 3 and all(line.startswith("closing CHILD_SA") for line in outcome.lines)
    assert summary(wire.initiator) == {"hq:established": [], "hq2:established": []}
    assert summary(wire.responder) == {"rw:established": [], "rw2:established": []}


def test_clear_sa_tunnel_phase_1_deletes_that_vpns_ike_sa() -> None:
    wire = farm()
    outcome = run(wire, wire.initiator, "clear sa tunnel hq2 phase 1")
    assert outcome.count == 1 and outcome.lines[0].startswith("deleting IKE_SA hq2[")
    assert summary(wire.initiator) == {"hq:established": ["net", "net2"]}
    assert summary(wire.responder) == {"rw:established": ["net", "net2"]}


def test_clear_sa_tunnel_phase_2_and_state() -> None:
    wire = farm()
    run(wire, wire.initiator, "clear sa tunnel hq phase 2")
    assert summary(wire.initiator) == {"hq:established": [], "hq2:established": ["lab"]}
    outcome = run(wire, wire.initiator, "clear sa state installed phase 2")
    assert outcome.count == 1
    assert summary(wire.initiator) == {"hq:established": [], "hq2:established": []}
    outcome = run(wire, wire.initiator, "clear sa state established phase 1")
    assert (
        outcome.count == 2 and wire.initiator.engine.sas == {} and wire.responder.engine.sas == {}
    )


def test_clear_sa_all_deletes_everything() -> None:
    wire = farm()
    outcome = run(wire, wire.initiator, "clear sa all")
    assert outcome.count == 2
    assert wire.initiator.engine.sas == {} and wire.responder.engine.sas == {}
    assert run(wire, wire.initiator, "clear sa all").count == 0


def test_clear_removes_a_half_open_sa_at_once() -> None:
    wire = pair()
    wire.initiator.engine.initiate("hq", "net", wire.now)  # never delivered
    outcome = run(wire, wire.initiator, "clear sa state connecting")
    assert outcome.count == 1 and outcome.pending_ike == []
    assert wire.initiator.engine.sas == {}


# -- rekey and reauth -----------------------------------------------------------------------------


def test_rekey_ike_sa_replaces_it_and_keeps_the_children() -> None:
    wire = farm()
    old = by_vpn(wire.initiator, "hq")
    spis = sorted(c.spi_in for c in old.children)
    outcome = run(wire, wire.initiator, "rekey ike-sa vpn hq")
    assert outcome.ok and outcome.count == 1 and outcome.lines == []
    new = by_vpn(wire.initiator, "hq")
    assert new.unique_id != old.unique_id and new.state == IkeSaState.ESTABLISHED
    assert sorted(c.spi_in for c in new.children) == spis
    assert summary(wire.responder) == {
        "rw:established": ["net", "net2"],
        "rw2:established": ["lab"],
    }


def test_rekey_child_sa_replaces_those_children_only() -> None:
    wire = farm()
    lab_before = by_vpn(wire.initiator, "hq2").children[0].spi_in
    net_before = {c.name: c.spi_in for c in by_vpn(wire.initiator, "hq").children}
    outcome = run(wire, wire.initiator, "rekey child-sa security-policy net")
    assert outcome.ok and outcome.count == 1
    net_after = {c.name: c.spi_in for c in by_vpn(wire.initiator, "hq").children}
    assert net_after["net"] != net_before["net"] and net_after["net2"] == net_before["net2"]
    assert by_vpn(wire.initiator, "hq2").children[0].spi_in == lab_before


def test_rekey_of_a_unique_id_counts_only_what_it_rekeys() -> None:
    wire = farm()
    lab = by_vpn(wire.initiator, "hq2").children[0]
    assert run(wire, wire.initiator, f"rekey child-sa unique-id {lab.unique_id}").count == 1
    assert run(wire, wire.initiator, f"rekey child-sa unique-id {lab.unique_id}").count == 0


def level0(effects: list[Effect]) -> list[tuple[str, object]]:
    return [
        (e.event, e.fields.get("unique_id", e.fields.get("new")))
        for e in effects
        if isinstance(e, Log) and e.level == 0
    ]


@pytest.mark.parametrize("make_before_break", [True, False])
def test_reauth_replaces_ike_and_children_in_the_order_make_before_break_says(
    make_before_break: bool,
) -> None:
    wire = farm()
    engine = wire.initiator.engine
    engine.policy = replace(engine.policy, make_before_break=make_before_break)
    old = by_vpn(wire.initiator, "hq")
    old_spis = {c.spi_in for c in old.children}
    start = len(wire.initiator.effects)
    outcome = run(wire, wire.initiator, "reauth ike-sa vpn hq")
    assert outcome.ok and outcome.count == 1
    new = by_vpn(wire.initiator, "hq")
    assert new.unique_id != old.unique_id and old.state == IkeSaState.DELETED
    assert sorted(c.name for c in new.children) == ["net", "net2"]
    assert not old_spis & {c.spi_in for c in new.children}
    assert summary(wire.responder) == {
        "rw:established": ["net", "net2"],
        "rw2:established": ["lab"],
    }
    kinds = [
        (e.kind, e.ike_unique_id)
        for e in wire.initiator.effects[start:]
        if isinstance(e, SaEvent)
        and e.kind in ("ike-established", "ike-deleted", "child-installed")
    ]
    up = [
        ("ike-established", new.unique_id),
        ("child-installed", new.unique_id),
        ("child-installed", new.unique_id),
    ]
    down = [("ike-deleted", old.unique_id)]
    assert kinds == (up + down if make_before_break else down + up)
    steps = [event for event, _ in level0(wire.initiator.effects[start:])]
    assert steps[0] == "reauthenticating_ike_sa"
    if make_before_break:
        assert steps.index("ike_sa_established") < steps.index("deleting_ike_sa")
    else:
        assert steps.index("ike_sa_deleted") < steps.index("reestablishing_ike_sa")


def test_a_make_before_break_reauth_that_fails_keeps_the_old_sa() -> None:
    wire = farm()
    engine = wire.initiator.engine
    engine.policy = replace(engine.policy, make_before_break=True)
    old = by_vpn(wire.initiator, "hq")
    outcome = management.execute(engine, parse_words("reauth", ["ike-sa", "vpn", "hq"]), wire.now)
    wire.run(outcome.effects, wire.initiator, drop=lambda _side, _e: True)
    while len(engine.sas) > 2:
        deadline = engine.next_deadline()
        assert deadline is not None
        wire.now = deadline
        engine.on_timer(deadline)
    assert by_vpn(wire.initiator, "hq") is old and old.state == IkeSaState.ESTABLISHED
    assert all(c.state == ChildSaState.INSTALLED for c in old.children)
