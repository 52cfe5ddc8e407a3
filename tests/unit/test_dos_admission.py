"""The worker's admission before DH: the final authority on the SA limits (issue 5)."""

from __future__ import annotations

from ikefarm.proto.messages import IkeLoad
from ikefarm.shared.dos.admission import share
from ikefarm.shared.ikev2.effects import HalfOpen, Log, PeerFailed
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.dos_helpers import feed, guarded_pair, init_requests, sent
from tests.engine_helpers import INITIATOR_TOML, config

DOS = "[ike.global-options.dos-protection]\n"
HALF_OPEN = "[ike.session.half-open]\n"


def test_shares_of_a_limit_add_up_to_it() -> None:
    for limit in (1, 2, 7, 300):
        for workers in (1, 2, 3, 8):
            assert sum(share(limit, s, workers) for s in range(workers)) == limit
    assert share(5, 0, 1) == 5


def test_init_limit_half_open_refuses_before_dh_at_the_limit() -> None:
    wire = guarded_pair(DOS + "init-limit-half-open = 3\nblock-threshold = 0")
    engine = wire.responder.engine
    requests = init_requests(4)
    for n, data in enumerate(requests[:3]):
        assert sent(feed(engine, data, f"198.51.100.{n}"))  # answered
    assert engine.counters["dh_computed"] == 3
    refused = feed(engine, requests[3], "198.51.100.9")
    assert sent(refused) == []  # dropped, no reply
    assert engine.counters["dh_computed"] == 3
    assert engine.counters["dos_refused.limit.init-limit-half-open"] == 1
    # one level-1 line when the limit is reached, not one per refused packet
    reached = [e for e in refused if isinstance(e, Log) and e.level == 1]
    assert [(e.event, e.fields) for e in reached] == [
        ("limit_reached", {"limit": "init-limit-half-open"})
    ]
    again = feed(engine, requests[3], "198.51.100.9")
    assert not [e for e in again if isinstance(e, Log) and e.level <= 1]
    engine.on_timer(1000.0 + 61)  # the half-open SAs expire
    cleared = feed(engine, requests[3], "198.51.100.9", now=1061.0)
    assert ("limit_cleared", {"limit": "init-limit-half-open"}) in [
        (e.event, e.fields) for e in cleared if isinstance(e, Log)
    ]


def test_other_shards_half_open_sas_count_toward_the_farm_limit() -> None:
    wire = guarded_pair(DOS + "init-limit-half-open = 3\nblock-threshold = 0")
    engine = wire.responder.engine
    assert engine.dos is not None
    engine.dos.load.update_shard(IkeLoad("ike-0", 0, 1, 2, 0, 1.0, {}, {}), 1000.0)
    first, second = init_requests(2)
    assert sent(feed(engine, first, "198.51.100.1"))
    assert sent(feed(engine, second, "198.51.100.2")) == []
    assert engine.counters["dh_computed"] == 1


def test_max_count_and_block_threshold() -> None:
    wire = guarded_pair(HALF_OPEN + "max-count = 2\n" + DOS + "block-threshold = 0")
    engine = wire.responder.engine
    for n, data in enumerate(init_requests(3)):
        feed(engine, data, f"198.51.100.{n}")
    assert engine.counters["dos_refused.limit.max-count"] == 1
    wire = guarded_pair(DOS + "block-threshold = 2")
    engine = wire.responder.engine
    a, b, c, d = init_requests(4)
    assert sent(feed(engine, a, "198.51.100.1")) and sent(feed(engine, b, "198.51.100.1"))
    assert sent(feed(engine, c, "198.51.100.1")) == []
    assert engine.counters["dos_refused.limit.block-threshold"] == 1
    assert sent(feed(engine, d, "198.51.100.2"))


def test_discard_duplicate_drops_without_reply_but_retransmissions_are_answered() -> None:
    wire = guarded_pair(HALF_OPEN + "discard-duplicate = true\n")
    engine = wire.responder.engine
    first, second = init_requests(2)
    answer = sent(feed(engine, first, "198.51.100.1"))
    assert answer
    assert sent(feed(engine, first, "198.51.100.1")) == answer  # retransmission: same answer
    assert sent(feed(engine, second, "198.51.100.1")) == []
    assert engine.counters["dos_refused.discard-duplicate"] == 1
    assert engine.counters["dh_computed"] == 1


def test_ike_sa_limit_holds_established_plus_half_open() -> None:
    wire = guarded_pair(DOS + "ike-sa-limit = 1")
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = wire.responder.engine.sas.values()
    assert sa.state == IkeSaState.ESTABLISHED
    (data,) = init_requests(1)
    assert sent(feed(wire.responder.engine, data, "198.51.100.1")) == []
    assert wire.responder.engine.counters["dos_refused.limit.ike-sa-limit"] == 1
    assert wire.responder.engine.counters["dh_computed"] == 1


def test_reduce_timeout_shortens_new_half_open_sas_once_the_count_is_reached() -> None:
    wire = guarded_pair(
        HALF_OPEN
        + "timeout = 40\n"
        + "[ike.session.half-open.thresholds.reduce-timeout]\ncount = 2\ntimeout = 5\n"
        + DOS
        + "block-threshold = 0"
    )
    engine = wire.responder.engine
    lifetimes = []
    for n, data in enumerate(init_requests(3)):
        effects = feed(engine, data, f"198.51.100.{n}", now=1000.0)
        lifetimes += [e.lifetime for e in effects if isinstance(e, HalfOpen)]
    assert lifetimes == [40.0, 40.0, 5.0]
    deadlines = sorted(sa.half_open_deadline for sa in engine.sas.values())
    assert deadlines == [1005.0, 1040.0, 1040.0]
    engine.on_timer(1005.0)
    assert len(engine.sas) == 2


def test_init_phase_failure_backs_the_peer_off_for_its_time() -> None:
    wire = guarded_pair("[ike.session.backoff-timeouts]\ninit-phase-failure = 10\n")
    engine = wire.responder.engine
    first, second, third = init_requests(3)
    # from an address no VPN matches: NO_PROPOSAL_CHOSEN, an init-phase failure
    engine.policy = type(engine.policy)(**{**engine.policy.__dict__, "initiator_only": True})
    effects = feed(engine, first, "198.51.100.1", now=1000.0)
    assert [e for e in effects if isinstance(e, PeerFailed)] == [
        PeerFailed("198.51.100.1", "init", 10.0)
    ]
    engine.policy = type(engine.policy)(**{**engine.policy.__dict__, "initiator_only": False})
    assert sent(feed(engine, second, "198.51.100.1", now=1009.9)) == []
    assert engine.counters["dos_refused.backoff.init-phase-failure"] == 1
    assert sent(feed(engine, second, "198.51.100.2", now=1009.9))
    assert sent(feed(engine, third, "198.51.100.1", now=1010.0))


def test_auth_phase_failure_backs_the_peer_off_and_is_reported() -> None:
    wire = guarded_pair(
        "[ike.session.backoff-timeouts]\nauth-phase-failure = 30\n", initiator_psk=b"wrong"
    )
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    failures = [e for e in wire.responder.effects if isinstance(e, PeerFailed)]
    assert failures == [PeerFailed("192.0.2.2", "auth", 30.0)]
    (data,) = init_requests(1)
    assert sent(feed(wire.responder.engine, data, "192.0.2.2", now=wire.now + 29)) == []
    assert sent(feed(wire.responder.engine, data, "192.0.2.2", now=wire.now + 30))


def test_without_backoff_configured_failures_change_nothing() -> None:
    wire = guarded_pair("", initiator_psk=b"wrong")
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert not [e for e in wire.responder.effects if isinstance(e, PeerFailed)]


def test_half_open_timeout_is_the_responders_half_open_lifetime() -> None:
    wire = guarded_pair(HALF_OPEN + "timeout = 30\n")
    engine = wire.responder.engine
    (data,) = init_requests(1)
    effects = feed(engine, data, "198.51.100.1", now=1000.0)
    assert [e.lifetime for e in effects if isinstance(e, HalfOpen)] == [30.0]
    engine.on_timer(1029.9)
    assert len(engine.sas) == 1
    engine.on_timer(1030.0)
    assert engine.sas == {} and engine.counters["half_open_expired"] == 1


def test_an_initiator_with_junos_half_open_settings_gives_up_after_60_seconds() -> None:
    """Seed 000: the responder's half-open timeout is configurable, the initiator keeps 60 s.
    Without [ike.session.half-open] the retransmission schedule alone decides (vSR)."""
    junos = IkeEngine(engine_policy(config(INITIATOR_TOML, HALF_OPEN + "timeout = 30\n")), shard=2)
    junos.initiate("hq", None, 1000.0)
    (sa,) = junos.sas.values()
    assert sa.half_open_deadline == 1060.0
    junos.on_timer(1059.9)
    assert len(junos.sas) == 1
    junos.on_timer(1060.0)
    assert junos.sas == {} and junos.counters["half_open_expired"] == 1

    vsr = IkeEngine(engine_policy(config(INITIATOR_TOML)), shard=2)
    vsr.initiate("hq", None, 1000.0)
    (sa,) = vsr.sas.values()
    assert sa.half_open_deadline is None
