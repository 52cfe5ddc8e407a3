"""Incremental load reports: a worker sends the peers whose half-open count changed, a full
table at most every interval, and every receiver merges them (shared/dos/load.py)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.messages import IkeLoad
from ikefarm.shared.dos.load import MAX_PEERS_REPORTED, FarmLoad, PeerReports
from tests.dos_helpers import feed, guarded_pair, init_requests, sent

NOW = 1000.0
A, B, C = "198.51.100.1", "198.51.100.2", "198.51.100.3"


def load(seq: int, peers: dict[str, int], full: bool, shard: int = 3) -> IkeLoad:
    return IkeLoad("ike-3", shard, seq, sum(peers.values()), 0, 1.0, peers, {}, peers_full=full)


def test_without_a_per_peer_limit_nothing_is_reported_per_peer() -> None:
    reports = PeerReports(1.0, needed=False)
    changed = {A, B}
    assert reports.report(Counter({A: 2, B: 1}), changed, NOW) == ({}, True)
    assert changed == set()  # drained all the same


def test_a_full_table_then_only_what_changed_then_full_again_after_an_interval() -> None:
    reports = PeerReports(1.0, needed=True)
    counts = Counter({A: 2, B: 1})
    changed = {A, B}
    assert reports.report(counts, changed, NOW) == ({A: 2, B: 1}, True)
    counts[A] = 3
    del counts[B]
    counts[C] = 1
    changed |= {A, B, C}
    assert reports.report(counts, changed, NOW + 0.1) == ({A: 3, B: 0, C: 1}, False)
    assert reports.report(counts, set(), NOW + 0.2) == ({}, False)  # nothing changed
    assert reports.report(counts, set(), NOW + 1.0) == ({A: 3, C: 1}, True)


def test_more_changes_than_a_report_carries_make_a_full_report() -> None:
    reports = PeerReports(1.0, needed=True)
    reports.report(Counter(), set(), NOW)
    many = {f"10.0.{i // 256}.{i % 256}" for i in range(MAX_PEERS_REPORTED + 1)}
    peers, full = reports.report(Counter(dict.fromkeys(many, 1)), set(many), NOW + 0.1)
    assert full and len(peers) == MAX_PEERS_REPORTED


def test_receivers_merge_deltas_into_the_last_full_table() -> None:
    farm = FarmLoad("ingress-1")
    assert farm.update_shard(load(1, {A: 2, B: 1}, full=True), NOW) is None
    assert farm.update_shard(load(2, {A: 3, B: 0, C: 1}, full=False), NOW + 0.1) is None
    assert [farm.peer_half_open(p, NOW + 0.1, exclude_shard=9) for p in (A, B, C)] == [3, 0, 1]
    # a full report replaces what the deltas built
    assert farm.update_shard(load(3, {C: 2}, full=True), NOW + 0.2) is None
    assert [farm.peer_half_open(p, NOW + 0.2, exclude_shard=9) for p in (A, B, C)] == [0, 0, 2]
    # an old delta is refused like any out-of-order snapshot
    assert farm.update_shard(load(2, {A: 9}, full=False), NOW + 0.3) == "stale_seq"
    assert farm.peer_half_open(A, NOW + 0.3, exclude_shard=9) == 0


def test_a_delta_without_a_fresh_table_counts_from_nothing() -> None:
    farm = FarmLoad("ingress-1")
    assert farm.update_shard(load(1, {A: 2}, full=True), NOW) is None
    # the table went stale (3 intervals without a report): the delta alone is known
    assert farm.update_shard(load(2, {B: 1}, full=False), NOW + 10) is None
    assert farm.peer_half_open(A, NOW + 10, exclude_shard=9) == 0
    assert farm.peer_half_open(B, NOW + 10, exclude_shard=9) == 1


def test_reports_without_the_new_field_are_full_tables() -> None:
    """A report from a worker that predates `peers_full` reads as a full table."""
    body = envelope._to_wire(load(1, {A: 1}, full=True))
    del body["peers_full"]
    message = envelope.build(IkeLoad, body)
    assert message.peers_full is True


@given(
    steps=st.lists(
        st.dictionaries(st.sampled_from([A, B, C, "2001:db8::1"]), st.integers(0, 4)),
        max_size=12,
    ),
    fulls=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_merged_deltas_always_equal_the_worker_table(
    steps: list[dict[str, int]], fulls: list[bool]
) -> None:
    """Whatever the order of changes and full reports, the receiver's table is the worker's."""
    reports = PeerReports(1.0, needed=True)
    farm = FarmLoad("ingress-1")
    counts: Counter[str] = Counter()
    changed: set[str] = set()
    now = NOW
    for seq, (step, full) in enumerate(zip(steps, fulls, strict=False), start=1):
        for peer, count in step.items():
            if count:
                counts[peer] = count
            else:
                counts.pop(peer, None)
            changed.add(peer)
        now += 1.0 if full else 0.01  # a second apart: the next report is a full table
        peers, is_full = reports.report(counts, changed, now)
        assert farm.update_shard(load(seq, peers, is_full), now) is None
        for peer in (A, B, C, "2001:db8::1"):
            assert farm.peer_half_open(peer, now, exclude_shard=9) == counts.get(peer, 0)


def test_the_sa_table_names_the_peers_whose_half_open_count_changed() -> None:
    wire = guarded_pair("[ike.global-options.dos-protection]\nblock-threshold = 5")
    engine = wire.responder.engine
    changes: set[str] = set()
    engine.sas.peer_changes = changes
    first, second = init_requests(2)
    assert sent(feed(engine, first, A))
    assert sent(feed(engine, second, B))
    assert changes == {A, B}
    changes.clear()
    engine.on_timer(NOW + 3600)  # both half-open SAs expire
    assert changes == {A, B} and not engine.sas.half_open_peers
