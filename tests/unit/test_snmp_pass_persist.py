"""The net-snmp pass_persist program (shared/cli/snmp.py) against a fixed farm snapshot:
its OID tree, get/getnext order, and malformed lines from snmpd (no bus: the bus part is
tests/interop/test_snmp.py)."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from ikefarm.shared.cli.snmp import BASE, FarmState, PassPersist, answer, build_tree, parse_oid

ROWS = [
    {
        "unique_id": 7, "vpn": "rw", "state": "established", "local_address": "192.0.2.1",
        "remote_address": "192.0.2.2", "local_id": "gw.example", "remote_id": "a.peer\nexample",
        "spi_i": "aa" * 8, "spi_r": "bb" * 8, "established_ago": 12, "children": [{}, {}],
    },
    {"unique_id": 9, "vpn": None, "state": "half-open", "local_address": "192.0.2.1",
     "remote_address": "192.0.2.3", "children": []},
]  # fmt: skip
WORKERS = [
    (
        {"auth_failed.auth_mismatch": 2, "datagrams": 50},
        {"half_open": 1, "engine": {"dropped.spi_mismatch": 3}},
    ),
    ({}, {"half_open": 0, "engine": {"dropped.spi_mismatch": 1, "retransmits": 4}}),
]


def walk(pp: PassPersist, start: str = ".1.3.6.1.4.1.32473.1") -> list[tuple[str, str, str]]:
    found = []
    oid = start
    while True:
        out = io.StringIO()
        pp.serve(io.StringIO(f"getnext\n{oid}\n"), out)
        lines = out.getvalue().splitlines()
        if lines == ["NONE"]:
            return found
        oid, kind, value = lines
        found.append((oid, kind, value))


def test_the_tree_has_counts_rows_and_errors_in_oid_order() -> None:
    pp = PassPersist(lambda: FarmState(ROWS, WORKERS))
    values = {oid: (kind, value) for oid, kind, value in walk(pp)}
    base = ".1.3.6.1.4.1.32473.1"
    assert values[f"{base}.1.1.0"] == ("gauge", "2")
    assert values[f"{base}.1.2.0"] == ("gauge", "1")
    assert values[f"{base}.1.3.0"] == ("gauge", "1")
    assert values[f"{base}.1.4.0"] == ("gauge", "2")
    assert values[f"{base}.1.5.0"] == ("counter64", "6")
    assert values[f"{base}.1.6.0"] == ("gauge", "2")
    assert values[f"{base}.2.1.1.1"] == ("string", "7")
    assert values[f"{base}.2.1.3.2"] == ("string", "half-open")
    assert values[f"{base}.2.1.7.1"] == ("string", "a.peer?example")  # one line per value
    assert values[f"{base}.2.1.8.1"] == ("gauge", "2")
    assert values[f"{base}.3.1.1.1"] == ("string", "auth_failed.auth_mismatch")
    assert values[f"{base}.3.1.2.2"] == ("counter64", "4")  # dropped.spi_mismatch, summed
    oids = [parse_oid(o) for o in values]
    assert oids == sorted(oids)  # type: ignore[type-var]


def test_get_ping_set_and_an_empty_farm() -> None:
    pp = PassPersist(lambda: None)  # the farm did not answer
    out = io.StringIO()
    pp.serve(io.StringIO("PING\nget\n.1.3.6.1.4.1.32473.1.1.1.0\nset\n.1.2\ninteger 1\n"), out)
    assert out.getvalue() == "PONG\nNONE\nnot-writable\n"
    entries = build_tree(FarmState([], []))
    assert answer(entries, "get", (*BASE, 1, 1, 0)) == ".1.3.6.1.4.1.32473.1.1.1.0\ngauge\n0\n"
    assert answer(entries, "get", (*BASE, 1, 1)) == "NONE\n"


def test_the_snapshot_is_reused_within_the_cache_time() -> None:
    calls = []
    now = [0.0]

    def fetch() -> FarmState:
        calls.append(now[0])
        return FarmState(ROWS, WORKERS)

    pp = PassPersist(fetch, cache=5.0, clock=lambda: now[0])
    walk(pp)
    now[0] = 4.9
    walk(pp)
    now[0] = 5.0
    walk(pp)
    assert calls == [0.0, 5.0]


@given(st.text(max_size=300))
def test_any_input_from_snmpd_gets_protocol_answers(text: str) -> None:
    pp = PassPersist(lambda: FarmState(ROWS, WORKERS))
    out = io.StringIO()
    pp.serve(io.StringIO(text), out)
    for reply in out.getvalue().split("\n")[:-1]:
        assert "\r" not in reply


@given(st.text(max_size=60))
def test_oids_parse_or_are_refused(text: str) -> None:
    oid = parse_oid(text)
    if oid is not None:
        assert all(0 <= n < 2**32 for n in oid)
        assert parse_oid(".".join(map(str, oid))) == oid


def test_the_program_refuses_to_run_while_snmp_is_off(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from ikefarm.shared.cli.main import main

    example = Path(__file__).resolve().parents[2] / "ops/examples/psk-responder.toml"
    config = tmp_path / "off.toml"
    config.write_text(example.read_text())
    assert main(["snmp", "pass-persist", "-c", str(config), "--nats", "nats://127.0.0.1:9"]) == 2
    assert "snmp = true" in capsys.readouterr().err
    config.write_text(example.read_text() + "\n[ike.global-options]\nsnmp = true\n")
    assert main(["snmp", "pass-persist", "-c", str(config), "--base", "1.x"]) == 2
    assert "not an OID" in capsys.readouterr().err
