"""Seed 004's three retransmission tables, from `retransmit.py` and from the engine itself.

The seed prints relative timeouts rounded to whole seconds and totals as the
rounded sum of the exact timeouts (4 x 1.8^4 = 41.99 -> "42s", the five first
add up to 89.48 -> "89s"). Its jitter ranges are computed from the rounded
relative timeouts (try 3: 23 s x 0.8 = "18.4s"), and its example column is one
draw of the jitter per try; pinning the engine's `uniform` to those draws makes
the engine retransmit exactly at the example totals.
"""

from __future__ import annotations

import pytest

from ikefarm.shared.ikev2.effects import SendDatagram
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges import informational
from ikefarm.shared.ikev2.policy import RetransmitPolicy
from ikefarm.shared.ikev2.retransmit import base_timeout, retransmit_timeout, total_timeout
from tests.engine_helpers import INITIATOR_TOML, config, pair

DEFAULTS = RetransmitPolicy(tries=5, timeout=4.0, base=1.8, jitter=0, limit=0)
LIMIT_40 = RetransmitPolicy(tries=5, timeout=4.0, base=1.8, jitter=0, limit=40)
JITTER_20 = RetransmitPolicy(tries=5, timeout=4.0, base=1.8, jitter=20, limit=40)

# try -> (relative timeout, total timeout), as the seed prints them
TABLE_DEFAULTS = [(4, 4), (7, 11), (13, 24), (23, 47), (42, 89), (76, 165)]
TABLE_LIMIT_40 = [(4, 4), (7, 11), (13, 24), (23, 47), (40, 87), (40, 127)]
# try -> (relative range, relative example, total range, total example)
TABLE_JITTER_20 = [
    ((3.2, 4), 3.7, (3.2, 4), 3.7),
    ((5.6, 7), 6.8, (8.8, 11), 10.5),
    ((10.4, 13), 12.1, (19.2, 24), 22.6),
    ((18.4, 23), 19.2, (37.6, 47), 41.8),
    ((32, 40), 38.7, (69.6, 87), 80.5),
    ((32, 40), 34.5, (101.6, 127), 115),
]


def seed_rows(policy: RetransmitPolicy) -> list[tuple[int, int]]:
    rows = []
    total = 0.0
    for attempt in range(policy.tries + 1):
        relative = base_timeout(policy, attempt)
        total += relative
        rows.append((round(relative), round(total)))
    return rows


@pytest.mark.parametrize(
    ("policy", "table"), [(DEFAULTS, TABLE_DEFAULTS), (LIMIT_40, TABLE_LIMIT_40)]
)
def test_relative_and_total_timeouts_match_the_seed(
    policy: RetransmitPolicy, table: list[tuple[int, int]]
) -> None:
    assert seed_rows(policy) == table
    assert round(total_timeout(policy)) == table[-1][1]


def test_default_total_is_the_dpd_timeout_the_seed_names() -> None:
    # "The total timeout with the default parameters is 165s."
    assert round(total_timeout(DEFAULTS)) == 165


def test_jitter_ranges_match_the_seed() -> None:
    jitter = JITTER_20.jitter / 100
    low_total = high_total = 0.0
    for attempt, (relative, _example, totals, _total_example) in enumerate(TABLE_JITTER_20):
        high = round(base_timeout(JITTER_20, attempt))
        low = round(high * (1 - jitter), 1)
        low_total, high_total = round(low_total + low, 1), high_total + high
        assert (low, high) == pytest.approx(relative)
        assert (low_total, high_total) == pytest.approx(totals)


def test_jitter_only_ever_shortens_a_timeout_by_at_most_the_percentage() -> None:
    for attempt in range(JITTER_20.tries + 1):
        exact = base_timeout(JITTER_20, attempt)
        assert retransmit_timeout(JITTER_20, attempt, lambda _a, _b: 0.0) == exact
        assert retransmit_timeout(JITTER_20, attempt, lambda _a, b: b) == pytest.approx(exact * 0.8)
        # the draw is asked for in the seed's range: random(0, retransmit-jitter)
        asked: list[tuple[float, float]] = []

        def draw(low: float, high: float, asked: list[tuple[float, float]] = asked) -> float:
            asked.append((low, high))
            return 0.0

        retransmit_timeout(JITTER_20, attempt, draw)
        assert asked == [(0.0, 20.0)]
    # no jitter configured: no draw at all
    retransmit_timeout(DEFAULTS, 0, lambda _a, _b: pytest.fail("drew without jitter"))


def _silent_initiator(policy: RetransmitPolicy, draws: list[float] | None = None) -> IkeEngine:
    wire = pair()
    engine = wire.initiator.engine
    engine.policy = type(engine.policy)(**{**engine.policy.__dict__, "retransmit": policy})
    if draws is not None:
        queue = list(draws)
        engine.uniform = lambda _a, _b: queue.pop(0)
    return engine


def _run_until_given_up(engine: IkeEngine, start: float) -> list[float]:
    """Send IKE_SA_INIT to nobody; the times of every retransmission, then of the give-up."""
    engine.initiate("hq", "net", start)
    times: list[float] = []
    while engine.sas:
        deadline = engine.next_deadline()
        assert deadline is not None
        # nothing happens a moment before a deadline
        assert engine.on_timer(deadline - 1e-6) == []
        effects = engine.on_timer(deadline)
        sent = [e for e in effects if isinstance(e, SendDatagram)]
        times.append(deadline - start)
        if engine.sas:
            assert len(sent) == 1 and sent[0].exchange == "retransmit"
        else:
            assert sent == []
    return times


@pytest.mark.parametrize(
    ("policy", "table"), [(DEFAULTS, TABLE_DEFAULTS), (LIMIT_40, TABLE_LIMIT_40)]
)
def test_the_engine_retransmits_at_the_seed_times_and_gives_up_after_the_last_try(
    policy: RetransmitPolicy, table: list[tuple[int, int]]
) -> None:
    engine = _silent_initiator(policy)
    times = _run_until_given_up(engine, 1000.0)
    # tries 1..5 are retransmissions, sent when the previous try timed out; the give-up
    # comes when try 5 has timed out: the total timeout of the table
    assert [round(t) for t in times] == [total for _relative, total in table]
    assert times[-1] == pytest.approx(total_timeout(policy))
    assert engine.counters["retransmits"] == policy.tries
    assert engine.counters["request_timeout.ike_sa_init"] == 1


def test_the_engine_with_the_seed_jitter_draws_retransmits_at_the_example_totals() -> None:
    draws = []
    for attempt, (_range, example, _totals, _total) in enumerate(TABLE_JITTER_20):
        draws.append((1 - example / base_timeout(JITTER_20, attempt)) * 100)
    assert all(0 <= d <= JITTER_20.jitter for d in draws)
    engine = _silent_initiator(JITTER_20, draws)
    times = _run_until_given_up(engine, 0.0)
    assert [round(t, 1) for t in times] == [total for *_, total in TABLE_JITTER_20]


def test_an_unanswered_liveness_check_gives_up_after_the_same_total() -> None:
    policy = RetransmitPolicy(tries=3, timeout=0.5, base=2.0, jitter=0, limit=0)
    wire = pair(
        initiator_vpn='ike-policy = { dpd-delay = "10s" }\nipsec-policy = { dpd-action = "clear" }'
    )
    initiator = wire.initiator.engine
    initiator.policy = type(initiator.policy)(**{**initiator.policy.__dict__, "retransmit": policy})
    wire.run(initiator.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = initiator.sas.values()
    sent_at = wire.now + 5
    informational.send_liveness(initiator, sa, sent_at)
    while initiator.sas:
        deadline = initiator.next_deadline()
        assert deadline is not None
        initiator.on_timer(deadline)
    assert deadline - sent_at == pytest.approx(total_timeout(policy)) == 7.5
    assert initiator.counters["request_timeout.dpd"] == 1


def test_config_defaults_are_the_seed_defaults() -> None:
    from ikefarm.shared.ikev2.policy import engine_policy

    policy = engine_policy(config(INITIATOR_TOML)).retransmit
    assert policy == DEFAULTS
