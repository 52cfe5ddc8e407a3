"""`ikefarm show|clear security flow session` check what comes back from the bus.

A stand-in answers the flow subjects on an open nats-server with good and malformed
replies; the real command prints the good rows, one error line per bad one, never a trace.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import subjects
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.show import (
    format_sessions,
    format_summary,
    row_problem,
    session_row,
    summary_problem,
)
from ikefarm.shared.flow.table import Session, SessionTable
from tests.service.test_cli_untrusted_replies import stand_in


def good_row(session_id: int) -> dict[str, Any]:
    table = SessionTable(FlowSettings())
    session = table.open((17, "10.200.0.2", 40000 + session_id, "10.100.0.2", 53), 0.0)
    assert isinstance(session, Session)
    return {**session_row(session, 1.0), "session_id": session_id}


def reply(body: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": 1, "ok": True, "body": body})


def run(argv: list[str], url: str, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv, *words, "--nats", url], capture_output=True, text=True, timeout=30, check=False
    )


def test_show_keeps_good_rows_and_names_each_bad_one(
    nats_server: EmbeddedNats, ikefarm_argv: list[str]
) -> None:
    bad_tuple = {**good_row(2), "in": [17, "not-an-address", 1, "10.0.0.1", 2]}
    escape = {**good_row(3), "policy": "\x1b[2Jpwned"}
    answers = {
        subjects.FLOW_SHOW: [
            reply({"instance": "flow-0", "rows": [good_row(1), bad_tuple, escape]})
        ]
    }
    with stand_in(nats_server.url, answers):
        for extra in ([], ["--json"]):
            done = run(ikefarm_argv, nats_server.url, "show", "security", "flow", "session", *extra)
            assert done.returncode == 0, done.stderr
            assert "Traceback" not in done.stderr and "\x1b" not in done.stdout
            errors = done.stderr.strip().splitlines()
            assert sum("ignored a malformed row" in e for e in errors) == 2, errors
            if extra:
                assert [r["session_id"] for r in json.loads(done.stdout)] == [1]
            else:
                assert "Session ID: 1," in done.stdout and "Total sessions: 1" in done.stdout


def test_bad_summary_and_clear_answers_are_errors(
    nats_server: EmbeddedNats, ikefarm_argv: list[str]
) -> None:
    answers = {
        subjects.FLOW_SHOW: [reply({"instance": "flow-0", "summary": {"sessions_in_use": "9"}})],
        subjects.FLOW_CLEAR: [reply({"instance": "flow-0", "count": "many"})],
    }
    with stand_in(nats_server.url, answers):
        summary = run(
            ikefarm_argv, nats_server.url, "show", "security", "flow", "session", "summary"
        )
        assert summary.returncode == 1 and "malformed summary" in summary.stderr
        cleared = run(ikefarm_argv, nats_server.url, "clear", "security", "flow", "session", "all")
        assert cleared.returncode == 1 and "Traceback" not in cleared.stderr


def test_no_flow_service_is_exit_2(nats_server: EmbeddedNats, ikefarm_argv: list[str]) -> None:
    done = run(
        ikefarm_argv, nats_server.url, "show", "security", "flow", "session", "--wait", "0.2"
    )
    assert done.returncode == 2 and "no flow service answered" in done.stderr


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patch=st.dictionaries(st.sampled_from(sorted(good_row(1))), values, max_size=4))
def test_row_check_guards_the_formatters(patch: dict[str, Any]) -> None:
    row = {**good_row(1), **patch}
    if row_problem(row) is None:
        format_sessions([row])


@settings(max_examples=100, deadline=None)
@given(summary=values)
def test_summary_check_guards_the_formatter(summary: Any) -> None:
    if summary_problem(summary) is None:
        format_summary(summary)
