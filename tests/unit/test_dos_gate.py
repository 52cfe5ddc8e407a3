"""The ingress gate, sans-I/O: each knob acts at its threshold and not before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ikefarm.proto.messages import IkeLoad, IngressLoad
from ikefarm.shared.dos.cookies import CookieJar, CookieSecret, InitRequest
from ikefarm.shared.dos.gate import COOKIE, DROP, FORWARD, IngressGate
from ikefarm.shared.dos.load import PENDING_TTL, BackoffTable, FarmLoad
from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.message import parse_message
from tests.dos_helpers import limits_of

ME = "ingress-0"
NOW = 100.0
DOS = "[ike.global-options.dos-protection]\n"


def gate(text: str = "") -> IngressGate:
    return IngressGate(limits_of(text), FarmLoad(ME), cookies=CookieJar(CookieSecret(1, b"s" * 32)))


def request(n: int, cookie: bytes | None = None) -> InitRequest:
    return InitRequest(n.to_bytes(8, "big"), 0, bytes([n % 256]) * 32, cookie)


def snapshot(
    shard: int = 0,
    seq: int = 1,
    half_open: int = 0,
    established: int = 0,
    peers: dict[str, int] | None = None,
    answered: int = 0,
) -> IkeLoad:
    return IkeLoad(
        f"ike-{shard}", shard, seq, half_open, established, 1.0, peers or {}, {ME: answered}
    )


def test_cookie_threshold_always_asks_everyone_then_accepts_the_cookie() -> None:
    g = gate(DOS + 'cookie-threshold = "always"')
    first = g.decide(request(1), "198.51.100.1", NOW)
    assert first.action == COOKIE and first.reason == "required" and first.reply
    cookie = parse_message(first.reply).message.notify(NotifyType.COOKIE).data  # type: ignore[union-attr]
    assert g.decide(request(1, cookie), "198.51.100.1", NOW).action == FORWARD
    # the cookie is bound to the address and the request
    assert g.decide(request(1, cookie), "198.51.100.2", NOW).reason == "invalid"
    assert g.decide(request(2, cookie), "198.51.100.1", NOW).reason == "invalid"
    assert g.counters["gate.cookie_sent"] == 3 and g.counters["gate.cookie_invalid"] == 2
    assert g.counters["gate.forwarded"] == 1


def test_cookie_threshold_zero_never_asks() -> None:
    g = gate(DOS + "cookie-threshold = 0\nblock-threshold = 0")
    g.load.update_shard(snapshot(half_open=250), NOW)
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.counters["gate.cookie_sent"] == 0


def test_cookie_threshold_n_acts_at_n_half_open_and_not_before() -> None:
    g = gate(DOS + "cookie-threshold = 3\nblock-threshold = 0")
    g.load.update_shard(snapshot(half_open=1), NOW)
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD  # 1 + 0 pending < 3
    assert g.decide(request(2), "198.51.100.2", NOW).action == FORWARD  # 1 + 1 pending < 3
    assert g.decide(request(3), "198.51.100.3", NOW).action == COOKIE  # 1 + 2 pending = 3
    assert [c.what for c in g.take_changes() if c.active] == ["cookies"]
    # the workers answered both: their half-open SAs show in the next snapshot
    g.load.update_shard(snapshot(seq=2, half_open=2, answered=2), NOW)
    assert g.half_open(NOW) == 2
    assert g.decide(request(4), "198.51.100.4", NOW).action == FORWARD
    g.load.update_shard(snapshot(seq=3, half_open=0, answered=3), NOW)
    g.refresh_modes(NOW)
    assert [(c.what, c.active) for c in g.take_changes()] == [("cookies", False)]


def test_init_limit_half_open_counts_pending_inits() -> None:
    g = gate(DOS + "cookie-threshold = 0\ninit-limit-half-open = 2\nblock-threshold = 0")
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.decide(request(2), "198.51.100.2", NOW).action == FORWARD
    refused = g.decide(request(3), "198.51.100.3", NOW)
    assert refused.action == DROP and refused.reason == "limit.init-limit-half-open"
    assert g.counters["gate.dropped.limit.init-limit-half-open"] == 1
    # one was refused by its worker (no SA), one is half-open: room for one more
    g.load.update_shard(snapshot(half_open=1, answered=2), NOW)
    assert g.decide(request(4), "198.51.100.4", NOW).action == FORWARD


def test_max_count_is_the_junos_name_of_the_same_ceiling() -> None:
    g = gate(DOS + "cookie-threshold = 0\n[ike.session.half-open]\nmax-count = 1\n")
    g.load.update_shard(snapshot(half_open=1), NOW)
    assert g.decide(request(1), "198.51.100.1", NOW).reason == "limit.max-count"


def test_init_limit_job_load_counts_inits_no_worker_answered() -> None:
    g = gate(DOS + "cookie-threshold = 0\ninit-limit-job-load = 2\nblock-threshold = 0")
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.decide(request(2), "198.51.100.2", NOW).action == FORWARD
    assert g.decide(request(3), "198.51.100.3", NOW).reason == "limit.init-limit-job-load"
    # another ingress's pending ones count too
    g.load.update_shard(snapshot(answered=2), NOW)
    g.load.update_ingress(IngressLoad("ingress-1", 1, 2, 1.0), NOW)
    assert g.decide(request(4), "198.51.100.4", NOW).reason == "limit.init-limit-job-load"
    g.load.update_ingress(IngressLoad("ingress-1", 2, 1, 1.0), NOW)
    assert g.decide(request(5), "198.51.100.5", NOW).action == FORWARD


def test_pending_inits_nobody_answers_are_forgotten_after_their_ttl() -> None:
    g = gate(DOS + "cookie-threshold = 0\ninit-limit-job-load = 1")
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.decide(request(2), "198.51.100.2", NOW + PENDING_TTL - 1).action == DROP
    assert g.decide(request(3), "198.51.100.3", NOW + PENDING_TTL + 1).action == FORWARD


def test_ike_sa_limit_counts_established_and_half_open() -> None:
    g = gate(DOS + "cookie-threshold = 0\nike-sa-limit = 3")
    g.load.update_shard(snapshot(established=2), NOW)
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.decide(request(2), "198.51.100.2", NOW).reason == "limit.ike-sa-limit"
    changes = g.take_changes()
    assert any(c.what == "ike-sa-limit" and c.active for c in changes)


def test_block_threshold_is_per_peer_ip() -> None:
    g = gate(DOS + "cookie-threshold = 0\nblock-threshold = 2")
    g.load.update_shard(snapshot(peers={"198.51.100.1": 1}), NOW)
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD  # 1 + 0 pending
    assert g.decide(request(2), "198.51.100.1", NOW).reason == "limit.block-threshold"
    assert g.decide(request(3), "198.51.100.2", NOW).action == FORWARD


def test_discard_duplicate_drops_a_new_init_from_a_peer_with_a_half_open_sa() -> None:
    text = DOS + "cookie-threshold = 0\n[ike.session.half-open]\ndiscard-duplicate = true\n"
    g = gate(text)
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    assert g.decide(request(2), "198.51.100.1", NOW).reason == "discard-duplicate"
    # the same negotiation again (a retransmission, an INVALID_KE_PAYLOAD retry) is not
    # a duplicate: it goes to the worker, which answers from its cache or anew
    assert g.decide(request(1), "198.51.100.1", NOW).action == FORWARD
    g.load.update_shard(snapshot(answered=2), NOW)  # refused by the worker: no SA
    assert g.decide(request(3), "198.51.100.1", NOW).action == FORWARD
    assert gate(DOS + "cookie-threshold = 0").decide(request(2), "198.51.100.1", NOW).action == (
        FORWARD
    )


def test_backoffs_drop_new_inits_from_the_peer_for_their_time() -> None:
    g = gate(DOS + "cookie-threshold = 0")
    g.backoff.add("198.51.100.1", "init", 5.0, NOW)
    g.backoff.add("198.51.100.2", "auth", 9.0, NOW)
    assert g.decide(request(1), "198.51.100.1", NOW + 4.9).reason == "backoff.init-phase-failure"
    assert g.decide(request(2), "198.51.100.2", NOW + 4.9).reason == "backoff.auth-phase-failure"
    assert g.decide(request(3), "198.51.100.1", NOW + 5.0).action == FORWARD
    assert g.decide(request(4), "198.51.100.3", NOW).action == FORWARD


def test_stale_worker_snapshots_stop_counting() -> None:
    g = gate()
    g.load.update_shard(snapshot(half_open=7), NOW)
    assert g.half_open(NOW + 2.9) == 7
    assert g.half_open(NOW + 3.1) == 0
    assert g.load.update_shard(snapshot(seq=1, half_open=1), NOW + 1) == "stale_seq"


@given(
    shard=st.integers(-5, 70000),
    seq=st.integers(-5, 10),
    half_open=st.integers(-5, 10),
    interval=st.floats(allow_nan=True, allow_infinity=True),
    peers=st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=4),
)
def test_any_snapshot_is_taken_or_refused_with_a_reason(
    shard: int, seq: int, half_open: int, interval: float, peers: dict[str, int]
) -> None:
    load = FarmLoad(ME)
    message = IkeLoad("x", shard, seq, half_open, 0, interval, peers, {})
    reason = load.update_shard(message, NOW)
    assert reason is None or isinstance(reason, str)
    assert load.half_open(NOW) >= 0


def test_a_restarted_worker_counting_from_zero_still_retires_pending_inits() -> None:
    g = gate(DOS + "cookie-threshold = 0\ninit-limit-job-load = 2")
    for n in (1, 2):
        assert g.decide(request(n), f"198.51.100.{n}", NOW).action == FORWARD
    g.load.update_shard(snapshot(seq=5, answered=2), NOW)
    assert g.load.own_pending(NOW) == 0
    for n in (3, 4):
        assert g.decide(request(n), f"198.51.100.{n}", NOW).action == FORWARD
    # the worker restarts: a higher seq (wall-clock based), its count from zero
    g.load.update_shard(snapshot(seq=9, answered=1), NOW)
    assert g.load.own_pending(NOW) == 1
    g.load.update_shard(snapshot(seq=10, answered=2), NOW)
    assert g.load.own_pending(NOW) == 0


def test_backoff_table_forgets_expired_peers_as_new_ones_come() -> None:
    table = BackoffTable()
    for index in range(100):  # a new failing peer every 10 s, each backing off 5 s
        table.add(f"198.51.100.{index + 1}", "auth", 5.0, now=10.0 * index)
        assert table.phase(f"198.51.100.{index + 1}", now=10.0 * index) == "auth"
    assert len(table) == 1  # not one entry per peer that ever failed
    table.add("203.0.113.1", "init", 60.0, now=1000.0)
    table.add("203.0.113.2", "init", 5.0, now=1001.0)
    assert len(table) == 2 and table.phase("203.0.113.1", now=1050.0) == "init"
