"""Every NATS subject ikefarm uses. Services build subjects only through this module.

Naming: `ikefarm.<owner>.<verb>`; per-shard subjects carry the shard number.
Requests expect a reply; events are fire-and-forget publishes.
"""

from __future__ import annotations

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
# ike -> every ingress: where a retransmitted IKE_SA_INIT must go (no queue group).
INGRESS_INIT_ROUTE = f"{PREFIX}.ingress.init-route"

# ike -> kernel: child SA install/delete (request/reply).
KERNEL_CHILD_INSTALL = f"{PREFIX}.kernel.child.install"
KERNEL_CHILD_DELETE = f"{PREFIX}.kernel.child.delete"
KERNEL_SHOW = f"{PREFIX}.kernel.show"
# ike -> kernel: trap policies (dpd-action trap; later start-action trap) (request/reply).
KERNEL_TRAP_INSTALL = f"{PREFIX}.kernel.trap.install"
KERNEL_TRAP_REMOVE = f"{PREFIX}.kernel.trap.remove"

# ike -> keystore: computations that need a secret (request/reply).
KEYSTORE_PSK_AUTH = f"{PREFIX}.keystore.psk.auth"
# ike -> keystore: certificate AUTH, signed and verified where the private keys live.
KEYSTORE_CERT_AUTH = f"{PREFIX}.keystore.cert.auth"

# ike -> anyone: SA lifecycle events (for show, flow, dashboards).
EVENT_IKE_SA = f"{PREFIX}.event.ike-sa"
EVENT_CHILD_SA = f"{PREFIX}.event.child-sa"

# CLI -> all ike workers: show commands gathered from every instance.
IKE_SHOW = f"{PREFIX}.ike.show"
# ike -> every ike worker: INITIAL_CONTACT received, drop older SAs of these identities.
IKE_INITIAL_CONTACT = f"{PREFIX}.ike.initial-contact"
# CLI -> all ike workers: rekey, reauth, flush, clear (each acts on the SAs it owns; the CLI
# gathers the answers like `show`).
IKE_COMMAND = f"{PREFIX}.ike.command"
# CLI -> any one ike worker (queue group): initiate a new IKE SA; the reply comes when it is
# established or has failed. A child for a VPN whose IKE SA is up goes to the owner's
# `ike_shard_command(shard)` instead.
IKE_INITIATE = f"{PREFIX}.ike.initiate"
