"""`ikefarm show|clear security flow session ...`: the flow service's table over the bus.

Junos SRX words (seed 003; docs/flow-sessions.md): the CLI checks the words first
(`shared/flow/filters.py`), asks the flow service (request/reply), checks every row it
gets back (`shared/flow/show.py:row_problem`) and prints the SRX layout, or JSON.
Exit codes: 0 done, 1 refused by the service, 2 bad words or no flow service answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

PREFIX = ["security", "flow", "session"]


def is_flow_command(words: list[str]) -> bool:
    return words[: len(PREFIX)] == PREFIX


def _usage_error(verb: str, words: list[str]) -> int:
    from ikefarm.shared.flow.filters import USAGE

    print(
        f"ikefarm {verb}: unknown words {' '.join(words[:3])!r}; usage: ikefarm {USAGE[verb]}",
        file=sys.stderr,
    )
    return 2


def cmd_flow(verb: str, args: argparse.Namespace, words: list[str]) -> int:
    from ikefarm.shared.cli.main import _load_or_exit, _nats_url
    from ikefarm.shared.flow.filters import FilterError, parse_words

    if not is_flow_command(words):
        return _usage_error(verb, words)
    words = words[len(PREFIX) :]
    try:
        parse_words(verb, words)
    except FilterError as exc:
        print(f"ikefarm {verb} security flow session: {exc}", file=sys.stderr)
        return 2
    config = _load_or_exit(args.config) if args.config else None
    url = _nats_url(args, config)
    return asyncio.run(_run(verb, words, url, args, config))


async def _run(verb: str, words: list[str], url: str, args: argparse.Namespace, config: Any) -> int:
    from ikefarm.proto import subjects
    from ikefarm.proto.messages import (
        FlowClearRequest,
        FlowClearResult,
        FlowShow,
        FlowShowRequest,
    )
    from ikefarm.shared.cli.manage import ask_one

    name = f"ikefarm {verb} security flow session"
    subject, request, reply_type = (
        (subjects.FLOW_SHOW, FlowShowRequest(words), FlowShow)
        if verb == "show"
        else (subjects.FLOW_CLEAR, FlowClearRequest(words), FlowClearResult)
    )
    answer, failed = await ask_one(
        url,
        args,
        config,
        subject,
        request,
        reply_type,
        timeout=args.wait + 2,
        name=name,
        answerer="flow service",
    )
    if failed is not None:
        return failed
    if verb == "clear":
        return _print_clear(answer, args)
    return _print_show(answer, args, name)


def _print_clear(result: Any, args: argparse.Namespace) -> int:
    if result.count < 0:
        print("ikefarm clear security flow session: bad count in the answer", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"cleared": result.count}))
    else:
        print(f"{result.count} active sessions cleared")
    return 0


def _print_show(show: Any, args: argparse.Namespace, name: str) -> int:
    from ikefarm.shared.cli.status import shown
    from ikefarm.shared.flow.show import (
        format_sessions,
        format_summary,
        row_problem,
        summary_problem,
    )

    if show.summary:
        problem = summary_problem(show.summary)
        if problem is not None:
            print(f"{name}: a malformed summary: {problem}", file=sys.stderr)
            return 1
        print(json.dumps(show.summary, indent=2) if args.json else format_summary(show.summary))
        return 0
    rows = []
    for row in show.rows:
        problem = row_problem(row)
        if problem is None:
            rows.append(row)
        else:
            print(f"{name}: ignored a malformed row from {shown(show.instance)}: {problem}",
                  file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_sessions(rows))
    if isinstance(show.truncated, int) and show.truncated > 0:
        print(f"{name}: {show.truncated} more sessions not shown; narrow the filter",
              file=sys.stderr)  # fmt: skip
    return 0
