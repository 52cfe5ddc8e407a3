"""The sans-I/O IKEv2 engine: feed it datagrams, time and replies; it returns effects.

One engine runs in each ike worker and owns the IKE SAs whose SPI carries its
shard. `receive()` takes a datagram (non-ESP marker already stripped by
ingress), `keystore_reply()` the answer to a `KeystoreRequest` it emitted,
`on_timer()` the current time. Each returns a list of effects (datagrams to
send, child SAs to install or delete, events, log lines). The engine never
reads a clock, opens a socket or logs: exactly like aioquic's QuicConnection.

Per-exchange rules live in `exchanges/`; this module does dispatch, message-ID
windows and retransmitted-request handling (RFC 7296 2.1-2.2), and timers.
"""

from __future__ import annotations

import itertools
import os
import random as random_module
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ikefarm.proto.sharding import shard_of_spi, spi_for_shard
from ikefarm.shared.dos.admission import WorkerAdmission
from ikefarm.shared.ikev2.constants import ExchangeType
from ikefarm.shared.ikev2.crypto.dh import DhExchange
from ikefarm.shared.ikev2.crypto.protection import IntegrityCheckFailed, MalformedEncryptedPayload
from ikefarm.shared.ikev2.effects import (
    DeleteChildSa,
    Effect,
    Endpoint,
    KeystoreAnswer,
    KeystoreCall,
    KeystoreRequest,
    Log,
    PeerFailed,
    SaEvent,
    SaFailed,
    SendDatagram,
)
from ikefarm.shared.ikev2.errors import MalformedMessage, UnsupportedCriticalPayload
from ikefarm.shared.ikev2.exchange_counts import INITIATOR, RESPONDER, TIMEOUT, result_of
from ikefarm.shared.ikev2.exchange_counts import count_exchange as _count_exchange
from ikefarm.shared.ikev2.exchanges import (
    child_create,
    child_rekey,
    create_child_sa,
    dpd,
    ike_auth,
    ike_init,
    informational,
    invalid_spi,
    lifetimes,
    mobike,
    nat_keepalive,
    rate_limits,
)
from ikefarm.shared.ikev2.exchanges import config as cfg_exchange
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.fragments import FragmentReassembler
from ikefarm.shared.ikev2.message import (
    IkeHeader,
    Message,
    ParsedMessage,
    decrypt_message,
    encode_message,
    encode_message_fragments,
    parse_message,
)
from ikefarm.shared.ikev2.payloads import Payload
from ikefarm.shared.ikev2.policy import EnginePolicy
from ikefarm.shared.ikev2.retransmit import retransmit_timeout
from ikefarm.shared.ikev2.sa import (
    CachedResponse,
    ChildSa,
    ChildSaState,
    IkeSa,
    IkeSaState,
    OutstandingRequest,
    SaTable,
)

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.snapshot import SaSecrets, SaSnapshot

# IPv6 minimum MTU minus IPv6 (40) and UDP (8) headers and the non-ESP marker (4):
# strongSwan's default fragment size leaves the same room (RFC 7383 2.5.1).
DEFAULT_FRAGMENT_SIZE = 1280 - 40 - 8 - 4
# inbound child SPIs remembered beyond twice those in use before the set is rebuilt
CHILD_SPI_SLACK = 1024
UNIQUE_ID_RANGE = 100_000
# unique ids of shard s are s * UNIQUE_ID_RANGE + 1, + 2, ...


class IkeEngine:
    def __init__(
        self,
        policy: EnginePolicy,
        shard: int = 0,
        *,
        random: Callable[[int], bytes] = os.urandom,
        uniform: Callable[[float, float], float] | None = None,
        dos: WorkerAdmission | None = None,
        unique_ids: Callable[[], int] | None = None,
    ) -> None:
        self.policy = policy
        # DoS limits (issue 5): admission before DH, backoffs, incoming exchange rates
        self.dos = dos
        self.exchange_rates = rate_limits.ExchangeRates(dos.limits) if dos is not None else None
        self.invalid_spi_answers = invalid_spi.new_window()
        self.shard = shard
        # shards whose SAs this engine continues besides its own (a dead worker's, adopted:
        # docs/failover.md); new SAs always get SPIs of `shard`
        self.adopted_shards: set[int] = set()
        # every random octet (SPIs, nonces, IVs, DH private keys) and every jitter comes from
        # these two: a test that injects seeded ones replays a negotiation byte for byte
        self.random = random
        self.uniform = uniform or random_module.SystemRandom().uniform
        self.sas = SaTable(deadline=_deadline)
        # responder half-open SAs by (SPIi, peer address, peer port), to answer a
        # retransmitted IKE_SA_INIT with the same response (RFC 7296 2.1)
        self.init_index: dict[tuple[bytes, str, int], bytes] = {}
        # keystore requests in flight: the SA (by local SPI) and the task that asked
        self.keystore_waits: dict[int, tuple[bytes, Task]] = {}
        self._child_spis: set[bytes] = set()
        self._child_spis_limit = CHILD_SPI_SLACK
        # child unique id -> the local SPI of its IKE SA (set where a child is made, restored
        # or moved by an IKE rekey); `find_child` drops what is gone. Rebuilt like _child_spis.
        self._child_index: dict[int, bytes] = {}
        self._child_index_limit = CHILD_SPI_SLACK
        self.counters: Counter[str] = Counter()
        self._last_unique_id = 0  # within this shard's range of unique ids
        # the ike service reserves farm-wide ids that survive its restarts (its blocks never
        # overlap, so adopted SAs keep theirs); alone (tests) the engine counts in its range
        self._unique_id_source = unique_ids
        self._request_ids = itertools.count(1)
        # the path (our endpoint, the peer's) of the request being dispatched: its response
        # goes there (RFC 7296 2.11), which with MOBIKE need not be the SA's path (RFC 4555 3.5)
        self.request_path: tuple[Endpoint, Endpoint] | None = None

    # -- identifiers -------------------------------------------------------------------------

    def new_ike_spi(self) -> bytes:
        while True:
            spi = spi_for_shard(self.shard, self.random(6))
            if spi not in self.sas and any(spi):
                return spi

    def new_child_spi(self) -> bytes:
        """An inbound child SPI none of our children has (0-255 are reserved, RFC 4303).

        The SPIs handed out are remembered: a superset of those in use, since every
        child's comes from here. When it outgrows twice the children of its last
        rebuild, it is rebuilt from the children: O(1) amortized, no walk per child.
        """
        if len(self._child_spis) > self._child_spis_limit:
            self._child_spis = {c.spi_in for sa in self.sas.values() for c in sa.children}
            self._child_spis_limit = 2 * len(self._child_spis) + CHILD_SPI_SLACK
        while True:
            spi = self.random(4)
            if int.from_bytes(spi, "big") >= 256 and spi not in self._child_spis:
                self._child_spis.add(spi)
                return spi

    def register_child(self, sa: IkeSa, child: ChildSa) -> None:
        """Index a new child by unique id (kernel counters and EXPIRE name children so).

        Entries of children since gone are dropped when looked up, or when the index
        outgrows twice the children of its last rebuild: O(1) amortized per child.
        """
        if len(self._child_index) > self._child_index_limit:
            self._child_index = {
                c.unique_id: s.local_spi for s in self.sas.values() for c in s.children
            }
            self._child_index_limit = 2 * len(self._child_index) + CHILD_SPI_SLACK
        self._child_index[child.unique_id] = sa.local_spi

    def find_child(self, unique_id: int) -> tuple[IkeSa, ChildSa] | None:
        """The live child with this unique id and its IKE SA, or None: one dict lookup, then
        the children of that IKE SA, never a walk over all the SAs."""
        spi = self._child_index.get(unique_id)
        sa = self.sas.get(spi) if spi is not None else None
        if sa is not None:
            for child in sa.children:
                if child.unique_id == unique_id:
                    return sa, child
        self._child_index.pop(unique_id, None)
        return None

    def new_dh(self, group: int) -> DhExchange:
        """A fresh DH key pair from the engine's source; with the system's source the
        cryptography library's generator makes it (the same kernel CSPRNG, less Python)."""
        return DhExchange.generate(group, None if self.random is os.urandom else self.random)

    def new_unique_id(self) -> int:
        if self._unique_id_source is not None:
            return self._unique_id_source()
        # unique across the farm: the shard is the high part, as in the SPI
        self._last_unique_id += 1
        return self.shard * UNIQUE_ID_RANGE + self._last_unique_id

    def new_request_id(self) -> int:
        return next(self._request_ids)

    # -- bookkeeping helpers used by the exchanges --------------------------------------------

    def drop(self, reason: str, **fields: Any) -> list[Effect]:
        self.counters[f"dropped.{reason}"] += 1
        return [Log(2, "encoding", "datagram_dropped", {"reason": reason, **fields})]

    def count(self, name: str) -> None:
        self.counters[name] += 1

    def peer_failed(self, remote: Endpoint, phase: str, now: float) -> list[Effect]:
        """A negotiation from `remote` failed in `phase`: back off, when configured."""
        if self.dos is None:
            return []
        seconds = self.dos.failed(remote.address, phase, now)
        if seconds is None:
            return []
        self.count(f"backoff.{phase}-phase-failure")
        return [PeerFailed(remote.address, phase, seconds)]

    def send(
        self,
        sa: IkeSa,
        message: Message,
        *,
        cache_response: bool = True,
        exchange: str = "",
    ) -> list[Effect]:
        """Encode (seal, fragment if the peer allows and it is large) and send."""
        datagrams: list[bytes]
        if message.protected:
            assert sa.protection is not None
            sk_e, sk_a = sa.outbound_keys()
            single = encode_message(message, sa.protection, sk_e, sk_a, random=self.random)
            if (
                sa.peer_fragmentation
                and len(single) > DEFAULT_FRAGMENT_SIZE
                and sa.vpn
                and sa.vpn.fragmentation
            ):
                datagrams = encode_message_fragments(
                    message, sa.protection, sk_e, sk_a, DEFAULT_FRAGMENT_SIZE, random=self.random
                )
            else:
                datagrams = [single]
        else:
            datagrams = [encode_message(message)]
        if message.is_response and cache_response:
            sa.last_response = CachedResponse(message.message_id, datagrams)
        name = exchange or _exchange_name(message.exchange_type)
        local, remote = sa.local, sa.remote
        if message.is_response and self.request_path is not None:
            local, remote = self.request_path
        return [SendDatagram(local, remote, d, name) for d in datagrams]

    def send_request(
        self,
        sa: IkeSa,
        exchange: ExchangeType,
        payloads: list[Payload],
        now: float,
        task: Task,
        *,
        protected: bool = True,
    ) -> list[Effect]:
        """Send `task`'s request; it is retransmitted per seed 004 until answered."""
        message = Message(
            exchange_type=exchange,
            spi_i=sa.spi_i,
            spi_r=sa.spi_r,
            message_id=sa.next_request_id,
            is_initiator=sa.is_initiator,
            is_response=False,
            payloads=payloads,
            protected=protected,
        )
        effects = self.send(sa, message)
        sa.outstanding = OutstandingRequest(
            message_id=message.message_id,
            exchange=int(exchange),
            task=task,
            datagrams=[e.data for e in effects if isinstance(e, SendDatagram)],
            attempt=0,
            next_at=now + retransmit_timeout(self.policy.retransmit, 0, self.uniform),
        )
        sa.next_request_id += 1
        return effects

    def queue_task(self, sa: IkeSa, task: Task, now: float) -> list[Effect]:
        """Start `task` now if the window is free, else when the outstanding request completes."""
        self.sas.touch(sa)
        if sa.outstanding is None and sa.state not in (IkeSaState.AUTHENTICATING,):
            return task.build(self, sa, now)
        sa.queued.append(task)
        return []

    def request_done(self, sa: IkeSa, now: float) -> list[Effect]:
        """The outstanding request is answered: free the window, start a queued task."""
        sa.outstanding = None
        if sa.queued and sa.local_spi in self.sas:
            return sa.queued.pop(0).build(self, sa, now)
        return []

    def ask_keystore(self, sa: IkeSa, task: Task, request: KeystoreCall) -> KeystoreRequest:
        """A keystore request on behalf of `task`; its answer goes to `task.keystore_answer`."""
        request_id = self.new_request_id()
        self.keystore_waits[request_id] = (sa.local_spi, task)
        return KeystoreRequest(request_id, request)

    def respond(
        self, sa: IkeSa, request: Message, payloads: list[Payload], *, protected: bool = True
    ) -> list[Effect]:
        response = Message(
            exchange_type=request.exchange_type,
            spi_i=sa.spi_i,
            spi_r=sa.spi_r,
            message_id=request.message_id,
            is_initiator=sa.is_initiator,
            is_response=True,
            payloads=payloads,
            protected=protected,
        )
        _count_exchange(self.counters, RESPONDER, request.exchange_type, result_of(payloads))
        return self.send(sa, response)

    def remove_sa(
        self, sa: IkeSa, reason: str, now: float, *, announce: bool = True
    ) -> list[Effect]:
        """Forget an IKE SA and uninstall its children."""
        effects: list[Effect] = []
        for child in sa.children:
            if child.state != ChildSaState.DELETED:
                child.state = ChildSaState.DELETED
                effects.append(
                    DeleteChildSa(
                        child.unique_id,
                        child.policy.reqid,
                        child.spi_in,
                        child.spi_out,
                        sa.local,
                        sa.remote,
                    )
                )
        was_established = sa.established_at is not None
        sa.state = IkeSaState.DELETED
        effects += cfg_exchange.release(sa)  # its VIP leases (none if a successor took them)
        self.sas.pop(sa.local_spi, None)
        key = sa.init_index_key
        if key is not None and self.init_index.get(key) == sa.local_spi:
            del self.init_index[key]
        sa.passive = None
        for request_id, (spi, _task) in list(self.keystore_waits.items()):
            if spi == sa.local_spi:
                del self.keystore_waits[request_id]
        if announce and was_established and sa.successor is None:
            effects.append(
                SaEvent(
                    "ike-deleted", sa.unique_id, sa.vpn.name if sa.vpn else None, {"reason": reason}
                )
            )
            effects.append(
                Log(
                    0,
                    "ike",
                    "ike_sa_deleted",
                    {
                        "vpn": sa.vpn.name if sa.vpn else None,
                        "unique_id": sa.unique_id,
                        "reason": reason,
                    },
                )
            )
        return effects + self._hand_over_child_tasks(sa, now)

    def _hand_over_child_tasks(self, sa: IkeSa, now: float) -> list[Effect]:
        """A rekeyed SA goes: the child work still queued on it (a delete, a rekey, one more
        child) moves to the SA that now holds the children (RFC 7296 2.18), not lost."""
        owner = sa.successor
        while owner is not None and owner.successor is not None:
            owner = owner.successor
        waiting, sa.queued = sa.queued, []
        if owner is None or owner.local_spi not in self.sas:
            return []
        effects: list[Effect] = []
        for task in waiting:
            if isinstance(task, ChildTasks):
                effects += self.queue_task(owner, task, now)
        return effects

    # -- snapshots (shared/ikev2/snapshot.py) -------------------------------------------------

    def snapshot(self, sa: IkeSa, now: float) -> tuple[SaSnapshot, SaSecrets]:
        """The SA's state without keys, and its keys apart (the part to seal)."""
        from ikefarm.shared.ikev2 import snapshot

        return snapshot.take(sa, now)

    def restore(self, state: SaSnapshot, secrets: SaSecrets, now: float) -> IkeSa:
        """Continue an SA snapshotted elsewhere; SnapshotError when it does not fit here."""
        from ikefarm.shared.ikev2 import snapshot

        return snapshot.restore(self, state, secrets, now)

    def adopt(self, sa: IkeSa) -> None:
        """Register an SA built outside an exchange (a restored snapshot)."""
        self.sas[sa.local_spi] = sa
        self._child_spis.update(c.spi_in for c in sa.children)
        for child in sa.children:
            self.register_child(sa, child)
        # ids are never handed out twice: skip past the adopted ones in our range
        base = self.shard * UNIQUE_ID_RANGE
        for unique_id in (sa.unique_id, *(c.unique_id for c in sa.children)):
            if base < unique_id < base + UNIQUE_ID_RANGE:
                self._last_unique_id = max(self._last_unique_id, unique_id - base)

    # -- inputs -----------------------------------------------------------------------------

    def receive(
        self,
        datagram: bytes,
        local: Endpoint,
        remote: Endpoint,
        now: float,
        header: IkeHeader | None = None,
    ) -> list[Effect]:
        """One IKE datagram from `remote` to `local`; `header` when ingress already read it."""
        try:
            parsed = parse_message(datagram, header)
        except MalformedMessage as exc:
            return self._malformed(datagram, exc, local, remote)
        header = parsed.header
        if (
            header.exchange_type == ExchangeType.IKE_SA_INIT
            and not header.is_response
            and not any(header.spi_r)
        ):
            return ike_init.respond(self, parsed, local, remote, now)
        our_spi = header.spi_r if header.is_initiator else header.spi_i
        sa = self.sas.get(our_spi)
        if sa is None:
            spi_shard = shard_of_spi(our_spi)
            if spi_shard != self.shard and spi_shard not in self.adopted_shards:
                return self.drop("wrong_shard", shard=spi_shard)
            return invalid_spi.answer(self, header, local, remote, now)
        self.sas.touch(sa)  # what follows may change it in place (children, requests)
        peer_spi = header.spi_i if header.is_initiator else header.spi_r
        connecting = (
            sa.state == IkeSaState.CONNECTING and header.exchange_type == ExchangeType.IKE_SA_INIT
        )
        if sa.remote_spi != peer_spi and not connecting:
            return self.drop("spi_mismatch")
        if header.is_initiator == sa.is_initiator:
            return self.drop("wrong_initiator_flag")
        if header.is_response:
            return self._receive_response(sa, parsed, local, remote, now)
        return self._receive_request(sa, parsed, local, remote, now)

    def _malformed(
        self, datagram: bytes, exc: MalformedMessage, local: Endpoint, remote: Endpoint
    ) -> list[Effect]:

        if isinstance(exc, UnsupportedCriticalPayload):
            return ike_init.refuse_critical(self, datagram, exc, local, remote) or self.drop(
                exc.reason
            )
        return self.drop(exc.reason)

    def _receive_request(
        self, sa: IkeSa, parsed: ParsedMessage, local: Endpoint, remote: Endpoint, now: float
    ) -> list[Effect]:
        header = parsed.header
        # RFC 7296 2.1/2.2: a retransmitted request gets the cached response again
        if sa.last_response is not None and header.message_id == sa.last_response.message_id:
            if parsed.is_fragment and parsed.encrypted.fragment_number != 1:  # type: ignore[union-attr]
                return []  # one retransmission per fragmented request is enough (RFC 7383 2.6.1)
            self.count("retransmitted_responses")
            # with MOBIKE the SA's path changes only by UPDATE_SA_ADDRESSES: answer where the
            # retransmission came from (RFC 4555 3.5, RFC 7296 2.11)
            to_local, to_remote = (local, remote) if mobike.in_use(sa) else (sa.local, sa.remote)
            return [
                SendDatagram(to_local, to_remote, d, "retransmit")
                for d in sa.last_response.datagrams
            ]
        jump = sa.message_id_jump and header.message_id == sa.expected_request_id + 1
        if header.message_id != sa.expected_request_id and not jump:
            return self.drop(
                "invalid_message_id", got=header.message_id, expected=sa.expected_request_id
            )
        if sa.state == IkeSaState.AUTHENTICATING:
            return self.drop("request_in_progress")
        if sa.protection is None or sa.keys is None:
            return self.drop("no_keys_yet")
        message = self._decrypt(sa, parsed)
        if isinstance(message, list):
            return message
        if message is None:
            return []  # fragment stored, waiting for the others
        effects: list[Effect] = []
        if sa.message_id_jump:  # the first verified request since the restore
            sa.message_id_jump = False
            if jump:
                # RFC 7296 2.2 keeps a window of one: a request one past the expected one
                # means the peer got the answer to the one before, which the snapshot missed
                sa.expected_request_id = header.message_id
                self.count("message_id_jumped")
                effects.append(
                    Log(
                        1,
                        "ike",
                        "message_id_jumped",
                        {"unique_id": sa.unique_id, "message_id": header.message_id},
                    )
                )
        sa.last_seen = now
        # RFC 7296 2.23: after a verified request, answer where it came from; with MOBIKE
        # only UPDATE_SA_ADDRESSES moves the SA (RFC 4555 3.5), the response still goes back
        # the way the request came (`request_path`)
        if not mobike.in_use(sa) and (sa.nat_detected or sa.remote != remote):
            sa.local, sa.remote = local, remote
        self.request_path = (local, remote)
        try:
            return effects + self._dispatch_request(sa, message, now)
        finally:
            self.request_path = None

    def _decrypt(self, sa: IkeSa, parsed: ParsedMessage) -> Message | list[Effect] | None:
        if parsed.encrypted is None:
            # after IKE_SA_INIT everything is protected: never act on a clear-text message
            return self.drop("unprotected_message")
        sk_e, sk_a = sa.inbound_keys()
        assert sa.protection is not None
        try:
            if parsed.is_fragment:
                if sa.reassembler is None or sa.reassembler.message_id != parsed.header.message_id:
                    sa.reassembler = FragmentReassembler(parsed.header.message_id)
                message = sa.reassembler.receive(parsed, sa.protection, sk_e, sk_a)
                if message is not None:
                    sa.reassembler = None
                return message
            return decrypt_message(parsed, sa.protection, sk_e, sk_a)
        except IntegrityCheckFailed:
            return self.drop("integrity_check_failed")
        except MalformedEncryptedPayload as exc:
            return self.drop(exc.reason)
        except MalformedMessage as exc:
            return self.drop(exc.reason)

    def _dispatch_request(self, sa: IkeSa, message: Message, now: float) -> list[Effect]:
        exchange = message.exchange_type
        if (
            exchange == ExchangeType.IKE_AUTH
            and sa.state == IkeSaState.HALF_OPEN
            and not sa.is_initiator
        ):
            return ike_auth.respond(self, sa, message, now)
        # a replaced (REKEYED) or closing SA still answers, e.g. the Delete that retires it
        if sa.state not in (
            IkeSaState.ESTABLISHED,
            IkeSaState.REKEYING,
            IkeSaState.REKEYED,
            IkeSaState.DELETING,
        ):
            return self.drop(
                "unexpected_exchange", exchange=_exchange_name(exchange), state=str(sa.state)
            )
        if self.exchange_rates is not None:
            exceeded = self.exchange_rates.exceeded(sa, message, now)
            if exceeded is not None:
                # the Message ID is not consumed: a retransmission gets through later
                return self.drop(f"rate_limited.{exceeded}", unique_id=sa.unique_id)
        sa.expected_request_id += 1
        if exchange == ExchangeType.INFORMATIONAL:
            return informational.respond(self, sa, message, now)
        if exchange == ExchangeType.CREATE_CHILD_SA:
            return create_child_sa.respond(self, sa, message, now)
        return self.drop("unexpected_exchange", exchange=_exchange_name(exchange))

    def _receive_response(
        self, sa: IkeSa, parsed: ParsedMessage, local: Endpoint, remote: Endpoint, now: float
    ) -> list[Effect]:
        outstanding = sa.outstanding
        if outstanding is None or parsed.header.message_id != outstanding.message_id:
            return self.drop("unexpected_response", message_id=parsed.header.message_id)
        if parsed.header.exchange_type != outstanding.exchange:
            return self.drop("response_exchange_mismatch")
        if outstanding.exchange == ExchangeType.IKE_SA_INIT:
            message = parsed.message
            if message is None:
                return self.drop("ike_sa_init_encrypted")
            _count_exchange(
                self.counters, INITIATOR, outstanding.exchange, result_of(message.payloads)
            )
            return ike_init.initiator_response(self, sa, parsed, message, now)
        if sa.protection is None or sa.keys is None:
            return self.drop("no_keys_yet")
        decrypted = self._decrypt(sa, parsed)
        if isinstance(decrypted, list):
            return decrypted
        if decrypted is None:
            return []
        sa.last_seen = now
        _count_exchange(
            self.counters, INITIATOR, outstanding.exchange, result_of(decrypted.payloads)
        )
        return outstanding.task.process(self, sa, decrypted, now)

    def keystore_reply(
        self, request_id: int, reply: KeystoreAnswer | None, now: float, error: str | None = None
    ) -> list[Effect]:
        """The keystore's typed answer (or `error` when it could not answer) to a
        KeystoreRequest: it goes to the task that asked."""
        waiting = self.keystore_waits.pop(request_id, None)
        sa = self.sas.get(waiting[0]) if waiting is not None else None
        if sa is None or waiting is None:
            self.count("keystore_reply_orphaned")
            return []
        self.sas.touch(sa)
        return waiting[1].keystore_answer(self, sa, reply, error, now)

    def on_timer(self, now: float) -> list[Effect]:
        """Run the timers that are due: only the SAs whose deadline has come are touched."""
        effects: list[Effect] = []
        for sa in self.sas.due(now):
            if sa.table is self.sas:  # not removed by an earlier one's timers
                effects += self._sa_timers(sa, now)
        return effects

    def _sa_timers(self, sa: IkeSa, now: float) -> list[Effect]:
        effects: list[Effect] = []
        outstanding = sa.outstanding
        if outstanding is not None and now >= outstanding.next_at:
            effects += self._retransmit(sa, outstanding, now)
            if sa.local_spi not in self.sas:
                return effects
        if (
            sa.half_open_deadline is not None
            and now >= sa.half_open_deadline
            and sa.established_at is None
        ):
            self.count("half_open_expired")
            effects.append(
                Log(
                    1,
                    "ike",
                    "half_open_expired",
                    {"unique_id": sa.unique_id, "peer": str(sa.remote)},
                )
            )
            return effects + self.remove_sa(sa, "half-open timeout", now)
        if sa.established_at is not None:
            for timer in SA_TIMERS:
                if sa.local_spi not in self.sas:
                    break
                effects += timer.on_timer(self, sa, now)
        return effects

    def _retransmit(self, sa: IkeSa, outstanding: OutstandingRequest, now: float) -> list[Effect]:
        retransmit = self.policy.retransmit
        if outstanding.attempt >= retransmit.tries:
            self.count(f"request_timeout.{outstanding.task.name}")
            _count_exchange(self.counters, INITIATOR, outstanding.exchange, TIMEOUT)
            effects: list[Effect] = [
                Log(
                    1,
                    "ike",
                    "retransmits_exhausted",
                    {
                        "unique_id": sa.unique_id,
                        "vpn": sa.vpn.name if sa.vpn else None,
                        "exchange": _exchange_name(outstanding.exchange),
                        "tries": outstanding.attempt,
                    },
                ),
                SaFailed(sa.unique_id, "peer not responding"),
            ]
            sa.outstanding = None
            return effects + self.peer_dead(sa, now)
        outstanding.attempt += 1
        outstanding.next_at = now + retransmit_timeout(
            retransmit, outstanding.attempt, self.uniform
        )
        self.count("retransmits")
        return [SendDatagram(sa.local, sa.remote, d, "retransmit") for d in outstanding.datagrams]

    def peer_dead(self, sa: IkeSa, now: float) -> list[Effect]:
        """The peer did not answer a request: apply dpd-action to each child, drop the SA."""
        return dpd.peer_dead(self, sa, now)

    def next_deadline(self) -> float | None:
        """When `on_timer` has something to do next (O(log n): a heap of the SAs' deadlines)."""
        return self.sas.next_deadline()

    # -- operations (management commands and timers call these) -------------------------------

    def initiate(self, vpn_name: str, child_name: str | None, now: float) -> list[Effect]:
        """Start an IKE SA to the VPN's remote address; with `child_name`, its first child too."""
        return ike_init.initiate(self, vpn_name, child_name, now)

    def create_child(self, sa: IkeSa, policy_name: str, now: float) -> list[Effect]:
        """Negotiate one more child SA on an established IKE SA (CREATE_CHILD_SA)."""
        self.sas.touch(sa)
        return create_child_sa.initiate_new_child(self, sa, policy_name, now)

    def rekey_child(self, sa: IkeSa, child: ChildSa, now: float) -> list[Effect]:
        """Replace a child SA by a fresh one (CREATE_CHILD_SA with REKEY_SA), then delete it."""
        self.sas.touch(sa)
        return create_child_sa.initiate_child_rekey(self, sa, child, now)

    def rekey_ike(self, sa: IkeSa, now: float) -> list[Effect]:
        """Replace the IKE SA by a fresh one that inherits the children (RFC 7296 2.18)."""
        self.sas.touch(sa)
        return create_child_sa.initiate_ike_rekey(self, sa, now)

    def delete_child(self, sa: IkeSa, child: ChildSa, now: float) -> list[Effect]:
        """Delete one child SA with the peer (INFORMATIONAL with a Delete payload)."""
        self.sas.touch(sa)
        return informational.initiate_child_delete(self, sa, child, now)

    def move_local(self, sa: IkeSa, local_address: str, now: float) -> list[Effect]:
        """Our address of this SA is gone or a better one appeared: move the SA there and
        tell the peer (MOBIKE UPDATE_SA_ADDRESSES, RFC 4555 3.5)."""
        return mobike.initiate_update(self, sa, local_address, now)

    def delete_ike(self, sa: IkeSa, now: float, reason: str = "deleted") -> list[Effect]:
        """Delete the IKE SA and its children with the peer."""
        self.sas.touch(sa)
        return informational.initiate_ike_delete(self, sa, now, reason)

    def initial_contact(
        self, local_id: str, remote_id: str, keep_unique_id: int, now: float
    ) -> list[Effect]:
        """Delete other SAs between these identities: the peer has forgotten them (RFC 7296 2.4)."""
        effects: list[Effect] = []
        for sa in self.sas.established_between(local_id, remote_id):
            if sa.unique_id != keep_unique_id and sa.local_spi in self.sas:
                self.count("initial_contact_deletes")
                effects += self.remove_sa(sa, "initial contact", now)
        return effects

    @property
    def half_open_count(self) -> int:
        """SAs not established yet, both roles (kept by the SA table, O(1))."""
        return self.sas.half_open

    @property
    def established_count(self) -> int:
        return self.sas.established


# queued tasks about children: they follow the children to the SA that replaced theirs
ChildTasks = (
    informational.ChildDeleteTask,
    child_rekey.ChildRekeyTask,
    child_create.NewChildTask,
)
# modules with per-SA timers: `on_timer(engine, sa, now)` and `deadline(sa)`
SA_TIMERS = (lifetimes, dpd, nat_keepalive)


def _deadline(sa: IkeSa) -> float | None:
    """The SA's next deadline: a retransmission, the half-open timeout, its SA timers."""
    deadlines: list[float] = []
    if sa.half_open_deadline is not None and sa.established_at is None:
        deadlines.append(sa.half_open_deadline)
    if sa.outstanding is not None:
        deadlines.append(sa.outstanding.next_at)
    if sa.established_at is not None:
        deadlines += [d for timer in SA_TIMERS if (d := timer.deadline(sa)) is not None]
    return min(deadlines) if deadlines else None


def _exchange_name(exchange_type: int) -> str:
    try:
        return ExchangeType(exchange_type).name
    except ValueError:
        return f"exchange-{exchange_type}"
