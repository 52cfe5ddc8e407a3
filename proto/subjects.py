"""Every NATS subject ikefarm uses. Services build subjects only through this module.

Naming: `ikefarm.<owner>.<verb>`; per-shard subjects carry the shard number.
Requests expect a reply; events are fire-and-forget publishes.
"""

from __future__ import annotations

import re

PREFIX = "ikefarm"
SERVICES = ("ingress", "ike", "keystore", "kernel", "flow")

# Queue groups: one member of the group handles each message.
QUEUE_IKE_WORKERS = "ike-workers"
QUEUE_INGRESS = "ingress"


def service_endpoint(service: str, endpoint: str) -> str:
    """Request subject of a service's endpoint, answered by any one instance."""
    return f"{PREFIX}.{service}.{endpoint}"


def instance_endpoint(service: str, instance: str, endpoint: str) -> str:
    """Request subject answered by one named instance."""
    return f"{PREFIX}.{service}.{instance}.{endpoint}"


# ingress -> ike: IKE_SA_INIT requests with SPIr = 0 go to any worker of the queue group.
IKE_INIT = f"{PREFIX}.ike.init"


def ike_shard(shard: int) -> str:
    """ingress -> ike: every later datagram, to the worker owning the SPI's shard."""
    return f"{PREFIX}.ike.shard.{shard}.datagram"


def ike_shard_command(shard: int) -> str:
    """CLI -> ike: management commands for the SAs of one shard."""
    return f"{PREFIX}.ike.shard.{shard}.command"


# ike -> ingress: datagrams to send from a given local address/port (queue group ingress).
INGRESS_SEND = f"{PREFIX}.ingress.send"
# an ingress instance's name as one subject token (what `ingress_instance_send` accepts)
_INSTANCE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def ingress_instance_send(instance: str) -> str | None:
    """ike -> the ingress instance that forwarded an IKE_SA_INIT: its answer, with the init
    route attached (`OutboundDatagram.init_route`); None for a name that is no subject token."""
    if not _INSTANCE_TOKEN.fullmatch(instance):
        return None
    return f"{INGRESS_SEND}.{instance}"


# ike -> every ingress: where a retransmitted IKE_SA_INIT must go (no queue group).
INGRESS_INIT_ROUTE = f"{PREFIX}.ingress.init-route"

# DoS protection (issue 5). No queue groups: every ingress and every worker needs them all.
# ike -> all: one shard's half-open/established counts and the inits it answered (IkeLoad).
IKE_LOAD = f"{PREFIX}.ike.load"
# ingress -> all: the IKE_SA_INIT an ingress forwarded that are not answered yet (IngressLoad).
INGRESS_LOAD = f"{PREFIX}.ingress.load"
# ike -> every ingress: a peer failed IKE_SA_INIT or IKE_AUTH; back off (PeerBackoff).
INGRESS_BACKOFF = f"{PREFIX}.ingress.backoff"
# JetStream KV bucket holding the farm's cookie secrets (current and previous, RFC 7296 2.6);
# only ingress reads or writes it.
COOKIE_SECRET_BUCKET = "ikefarm-cookie-secret"  # noqa: S105 - a bucket name, not a secret
COOKIE_RECORD = "record"
# JetStream KV bucket of unique-id reservations: key `shard-<n>` holds the next id counter
# of that shard not yet handed to a worker, so a restarted worker never reuses an id
UNIQUE_ID_BUCKET = "ikefarm-unique-ids"


def unique_id_key(shard: int) -> str:
    return f"shard-{shard}"


# JetStream KV bucket where ike workers started with `--shard auto` claim their shard
# (services/ike/shard_claim.py); only ike workers read or write it.
IKE_SHARDS_BUCKET = "ikefarm-ike-shards"
# JetStream KV bucket of IKE SA snapshots (docs/failover.md): key `shard-<n>.<local SPI hex>`,
# the snapshot without keys and the keys sealed under the keystore's snapshot key
IKE_SA_BUCKET = "ikefarm-ike-sas"


def ike_sa_key(shard: int, local_spi: bytes) -> str:
    return f"shard-{shard}.{local_spi.hex()}"


def ike_sa_prefix(shard: int) -> str:
    return f"shard-{shard}."


# JetStream KV buckets of the farm's VIP leases (services/ike/vip_leases.py,
# docs/vip-pools.md): one record per leased address and per identity's last address, and
# the workers' liveness records (a short max age, renewed while the worker lives) that say
# whether a lease's owner can still hold it. Only ike workers read or write them.
VIP_LEASE_BUCKET = "ikefarm-vip-leases"
VIP_HOLDER_BUCKET = "ikefarm-vip-holders"


# ike -> kernel: child SA install/delete (request/reply).
KERNEL_CHILD_INSTALL = f"{PREFIX}.kernel.child.install"
KERNEL_CHILD_DELETE = f"{PREFIX}.kernel.child.delete"
KERNEL_CHILD_UPDATE = f"{PREFIX}.kernel.child.update"  # MOBIKE: new endpoints (ChildUpdate)
KERNEL_ROUTE_SOURCE = f"{PREFIX}.kernel.route-source"  # MOBIKE: our source toward a peer
KERNEL_SHOW = f"{PREFIX}.kernel.show"
# ike -> kernel: the public half of the kernel service's transport key, to seal child SA keys
# to (`shared/bus/child_keys.py`); only the kernel user subscribes to `ikefarm.kernel.>`.
KERNEL_TRANSPORT_KEY = f"{PREFIX}.kernel.transport-key"
# ike -> kernel: trap policies (dpd-action trap, start-action trap) (request/reply).
KERNEL_TRAP_INSTALL = f"{PREFIX}.kernel.trap.install"
KERNEL_TRAP_REMOVE = f"{PREFIX}.kernel.trap.remove"
# CLI -> kernel: `flush kernel ...` removes installed child SAs (request/reply).
KERNEL_FLUSH = f"{PREFIX}.kernel.flush"
# ike -> kernel: install/remove a VIP we were assigned (VipAddress -> KernelAck).
KERNEL_VIP = f"{PREFIX}.kernel.vip"
# ingress -> kernel: which backend runs (`auto` resolved), KernelBackendRequest ->
# KernelBackend; the kernel service also publishes it on EVENT_KERNEL_BACKEND when it starts.
# Ingress sets UDP_ENCAP on its NAT-T sockets only for `netlink` (docs/kernel-netlink.md).
KERNEL_BACKEND = f"{PREFIX}.kernel.backend"

# ike -> keystore: computations that need a secret (request/reply).
KEYSTORE_PSK_AUTH = f"{PREFIX}.keystore.psk.auth"
KEYSTORE_PPK_MIX = f"{PREFIX}.keystore.ppk.mix"
KEYSTORE_TRANSPORT_KEY = f"{PREFIX}.keystore.transport-key"
# anyone -> keystore: a request for a secret itself; answered with a refusal, always.
KEYSTORE_SECRET = f"{PREFIX}.keystore.secret.get"
# ike -> keystore: certificate AUTH, signed and verified where the private keys live.
KEYSTORE_CERT_AUTH = f"{PREFIX}.keystore.cert.auth"
# ike -> keystore: SA snapshot secrets (docs/failover.md): sealed to the transport key in,
# sealed under the keystore's snapshot key out (seal); and back to a worker's ephemeral key
# (unseal). The keystore never returns them readable.
KEYSTORE_SA_SEAL = f"{PREFIX}.keystore.sa.seal"
KEYSTORE_SA_UNSEAL = f"{PREFIX}.keystore.sa.unseal"
# ike -> keystore: EAP relayed to RADIUS, whose shared secret and MSKs stay in the keystore
# (docs/radius.md): one EAP message per request; the AUTH from a sealed MSK; accounting.
KEYSTORE_EAP_RELAY = f"{PREFIX}.keystore.eap.relay"
KEYSTORE_EAP_AUTH = f"{PREFIX}.keystore.eap.auth"
KEYSTORE_RADIUS_ACCOUNTING = f"{PREFIX}.keystore.radius.accounting"

# ike -> anyone: SA lifecycle events (for show, flow, dashboards).
EVENT_IKE_SA = f"{PREFIX}.event.ike-sa"
EVENT_CHILD_SA = f"{PREFIX}.event.child-sa"

# kernel -> ike (and anyone): the dataplane asks for a child SA (ACQUIRE: traffic hit a trap
# policy) or says one reached its soft (rekey) or hard (gone) lifetime (EXPIRE).
EVENT_KERNEL_ACQUIRE = f"{PREFIX}.event.kernel.acquire"
EVENT_KERNEL_EXPIRE = f"{PREFIX}.event.kernel.expire"
EVENT_KERNEL_ADDRESSES = f"{PREFIX}.event.kernel.addresses"  # LocalAddresses (MOBIKE)
EVENT_KERNEL_BACKEND = f"{PREFIX}.event.kernel.backend"  # KernelBackend, at the kernel's start
# Flow sessions (issue 12, docs/flow-sessions.md). kernel (dataplane) -> flow: batched session
# events (FlowEvents): first packets, TCP state changes, periodic refreshes; never per packet.
FLOW_EVENTS = f"{PREFIX}.flow.events"
# flow -> kernel (dataplane): sessions closed or refused, table full (FlowVerdicts).
KERNEL_FLOW_VERDICTS = f"{PREFIX}.kernel.flow.verdicts"
# CLI -> flow: `show|clear security flow session ...` (request/reply).
FLOW_SHOW = f"{PREFIX}.flow.show"
FLOW_CLEAR = f"{PREFIX}.flow.clear"

# CLI -> all ike workers: show commands gathered from every instance.
IKE_SHOW = f"{PREFIX}.ike.show"
# admin -> one ike worker (queue group): the farm's VIP leases (VipPoolShowRequest).
IKE_VIP_POOL_SHOW = f"{PREFIX}.ike.vip-pool.show"
# ike -> every ike worker: INITIAL_CONTACT received, drop older SAs of these identities.
IKE_INITIAL_CONTACT = f"{PREFIX}.ike.initial-contact"
# kernel -> every ike worker: batched per-child counters, periodically (KernelCounters,
# docs/kernel-counters.md); each worker takes the children it owns (DPD, show ike-sa details).
IKE_KERNEL_COUNTERS = f"{PREFIX}.ike.kernel-counters"
# CLI -> all ike workers: rekey, reauth, flush, clear (each acts on the SAs it owns; the CLI
# gathers the answers like `show`).
IKE_COMMAND = f"{PREFIX}.ike.command"
# CLI -> any one ike worker (queue group): initiate a new IKE SA; the reply comes when it is
# established or has failed. A child for a VPN whose IKE SA is up goes to the owner's
# `ike_shard_command(shard)` instead.
IKE_INITIATE = f"{PREFIX}.ike.initiate"


# -- bus permissions -------------------------------------------------------------------------
#
# One NATS user per service (and one for the CLI): what each may publish and subscribe to.
# `ikefarm up` writes these into its embedded nats-server's `authorization` block
# (shared/bus/auth.py); `ikefarm config nats-auth` prints them for an external NATS.
# Every user has its own reply inbox prefix (`_INBOX_<user>.`, nats-py's `inbox_prefix`) and
# may subscribe only there: no user can read, nor publish into, another user's replies. Answers
# to the requests a user serves go out through the broker's `allow_responses` (the reply subject
# of a request it received), never through a blanket `_INBOX.>` right. NATS micro discovery is
# per service kind: a service user answers `$SRV.<verb>.ikefarm-<its kind>[.<id>]` only, so a
# reply to `$SRV.INFO.ikefarm-keystore` can come from the keystore user alone; the bare
# `$SRV.PING/INFO/STATS` stay subscribable for generic tools (`nats micro ls`), and the CLI
# never asks them. Only ike workers may publish to `ikefarm.keystore.>` computations.

MICRO_PREFIX = "$SRV"
MICRO_VERBS = ("PING", "INFO", "STATS")
MICRO_NAME_PREFIX = f"{PREFIX}-"  # a service registers with NATS micro as `ikefarm-<kind>`
ADMIN_USER = "admin"  # the `ikefarm` CLI: status, show, initiate, rekey, ...


def inbox_prefix(user: str) -> str:
    """The reply inbox prefix of a bus user (a service kind, or `admin` for the CLI)."""
    return f"_INBOX_{user}"


def own_inboxes(user: str) -> str:
    return f"{inbox_prefix(user)}.>"


def micro_name(service: str) -> str:
    """The NATS micro service name of a service kind."""
    return f"{MICRO_NAME_PREFIX}{service}"


def micro_subject(verb: str, service: str) -> str:
    """`$SRV.<verb>.ikefarm-<service>`: discovery asked of one service kind only."""
    return f"{MICRO_PREFIX}.{verb}.{micro_name(service)}"


def _micro_answered(service: str) -> tuple[str, ...]:
    """The discovery subjects a service's micro registration subscribes to."""
    return (
        *(f"{MICRO_PREFIX}.{verb}" for verb in MICRO_VERBS),
        f"{MICRO_PREFIX}.*.{micro_name(service)}",
        f"{MICRO_PREFIX}.*.{micro_name(service)}.*",
    )


def own_subjects(service: str) -> str:
    """Every endpoint a service answers (`ikefarm.<service>.…`, ping/stats included)."""
    return f"{PREFIX}.{service}.>"


def _discovery(service: str) -> tuple[str, ...]:
    """The built-in ping/stats endpoints of a service, for any instance."""
    return tuple(
        subject
        for endpoint in ("ping", "stats")
        for subject in (
            service_endpoint(service, endpoint),
            instance_endpoint(service, "*", endpoint),
        )
    )


def _kv_api(bucket: str, *, watch: bool = False) -> tuple[str, ...]:
    """What nats-py's KV client sends for one bucket: create, get, CAS update (and watch)."""
    stream = f"KV_{bucket}"
    api = (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$KV.{bucket}.>",
    )
    if not watch:
        return api
    return (
        *api,
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",  # the watch reads its consumer's info
        f"$JS.FC.{stream}.>",  # flow-control answers of the watch's ordered consumer
    )


PERMISSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "ingress": {
        "publish": (
            IKE_INIT,
            f"{PREFIX}.ike.shard.*.datagram",
            INGRESS_LOAD,
            KERNEL_BACKEND,  # UDP_ENCAP on the NAT-T socket only with the netlink backend
            *_kv_api(COOKIE_SECRET_BUCKET, watch=True),  # only ingress holds the secret
        ),
        "subscribe": (own_subjects("ingress"), IKE_LOAD, EVENT_KERNEL_BACKEND),
    },
    "ike": {
        "publish": (
            INGRESS_SEND,
            f"{INGRESS_SEND}.*",
            INGRESS_INIT_ROUTE,
            INGRESS_BACKOFF,
            IKE_INITIAL_CONTACT,
            IKE_LOAD,
            f"{PREFIX}.keystore.>",
            f"{PREFIX}.kernel.child.>",
            f"{PREFIX}.kernel.trap.>",
            KERNEL_VIP,
            KERNEL_ROUTE_SOURCE,
            EVENT_IKE_SA,
            EVENT_CHILD_SA,
            KERNEL_TRANSPORT_KEY,
            KERNEL_SHOW,  # adopted children the kernel lost are rekeyed (docs/failover.md)
            IKE_SHOW,  # the children other workers hold, before an orphan is deleted
            *_kv_api(UNIQUE_ID_BUCKET),
            *_kv_api(IKE_SHARDS_BUCKET, watch=True),  # `--shard auto` claims
            *_kv_api(VIP_LEASE_BUCKET, watch=True),  # leases; `show vip-pool` lists keys
            *_kv_api(VIP_HOLDER_BUCKET),
            *_kv_api(IKE_SA_BUCKET, watch=True),  # SA snapshots, listed at adoption
        ),
        "subscribe": (
            own_subjects("ike"),
            EVENT_KERNEL_ACQUIRE,
            EVENT_KERNEL_EXPIRE,
            EVENT_KERNEL_ADDRESSES,
        ),
    },
    "keystore": {"publish": (), "subscribe": (own_subjects("keystore"),)},
    "kernel": {
        # lifetimes the userspace dataplane counts go out as child-SA events
        "publish": (
            EVENT_KERNEL_ACQUIRE,
            EVENT_KERNEL_EXPIRE,
            EVENT_KERNEL_ADDRESSES,
            EVENT_KERNEL_BACKEND,
            EVENT_CHILD_SA,
            FLOW_EVENTS,
            IKE_KERNEL_COUNTERS,
        ),
        "subscribe": (own_subjects("kernel"),),
    },
    "flow": {
        "publish": (KERNEL_FLOW_VERDICTS,),
        "subscribe": (own_subjects("flow"), f"{PREFIX}.event.>"),
    },
    ADMIN_USER: {
        "publish": (
            f"{MICRO_PREFIX}.>",
            IKE_SHOW,
            IKE_VIP_POOL_SHOW,
            IKE_COMMAND,
            IKE_INITIATE,
            f"{PREFIX}.ike.shard.*.command",
            KERNEL_SHOW,
            KERNEL_FLUSH,
            FLOW_SHOW,
            FLOW_CLEAR,
            *(subject for service in SERVICES for subject in _discovery(service)),
        ),
        "subscribe": (f"{PREFIX}.event.>",),
    },
}


def permissions(user: str) -> dict[str, tuple[str, ...]]:
    """The publish and subscribe allow-lists of one user, its own inbox and discovery included.

    A user may publish to its own inbox (a message to itself, see
    `shared/bus/runtime.subscriptions_in_place`), never to another user's.
    """
    table = PERMISSIONS[user]
    discovery = _micro_answered(user) if user in SERVICES else ()
    return {
        "publish": (own_inboxes(user), *table["publish"]),
        "subscribe": (own_inboxes(user), *discovery, *table["subscribe"]),
    }
