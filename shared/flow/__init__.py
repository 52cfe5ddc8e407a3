"""Flow sessions with Junos SRX semantics (seed 003; docs/flow-sessions.md), sans-I/O.

`table.SessionTable` owns the sessions, their timers and the commands; time comes in as an
argument. `events` checks the dataplane's batched session events before they touch the
table; `filters` parses the words of `show`/`clear security flow session`; `show` renders
the SRX layout. Services feed it (`services/flow/`); nothing here does I/O.
"""
