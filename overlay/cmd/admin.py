"""The operator's commands against the etcd registry: ``overlay net``, ``overlay host``,
``overlay endpoint``.

They read and write exactly the keys and values of the registry contract (DESIGN.md,
overlay/core/registry.py): every value is built as a registry type and written with
``Schema.encode``, so what these commands do and what ``etcdctl put``/``del`` of the same key
does are one and the same to the agents, and ``ls`` shows what etcdctl wrote.

- ``net create`` is a compare-and-create (an existing network is an error, never overwritten);
  ``net set`` changes an existing network (``--encrypted``/``--no-encrypted``, ``--nat``/
  ``--no-nat``) with a compare-and-set on the value it read, keeping fields it does not know (a
  newer tool's); ``"nat"`` is written only when asked for, so the default (on with a gateway)
  holds otherwise;
  ``net rm`` deletes the network key and everything under it (members, endpoints) in one
  transaction, and without ``--force`` only if no host is a member (checked in that transaction).
- ``endpoint add`` writes without a lease: the endpoint is the operator's and stays until
  removed. It does not overwrite an endpoint an agent holds under its lease.
- ``net join``/``net leave`` are not registry commands: they ask the agent of this network
  namespace over its control socket (overlay.cmd.cli's ``_ask``, as ``status`` does).
- ``host ls``: a host key lives under its agent's lease, so present means alive; the lease's
  remaining TTL is shown. Hosts named by members or endpoints but without a key are listed as
  not alive.
- Encryption: a network becomes encrypted (created so, or ``net set --encrypted``) only if
  every member host publishes a ``pubkey`` (an older agent cannot encrypt and would be cut
  off), unless ``--force``; that check and the write are one transaction, so a member that
  joins or changes meanwhile makes the command read again.

Each command validates its input first (UserError, exit 2, saying the expected form), then
runs one ``asyncio.run``: connect (3 s per endpoint), do its reads and writes, close. etcd
failures are RunError (exit 1), one line. aetcd and asyncio are imported inside the commands,
so ``overlay --version`` does not pay for them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from overlay.cmd.errors import RunError, UserError
from overlay.core.addresses import format_address
from overlay.core.wire import MTU_MAX, MTU_MIN, VNI_MAX, unicast_mac

if TYPE_CHECKING:
    import aetcd

    from overlay.core.registry import Endpoint, Host, Network, Schema
    from overlay.core.status import ProbeStatus
    from overlay.io.etcd import Tls

DEFAULT_ETCD = "http://127.0.0.1:2379"
ENV_ETCD = "OVERLAY_ETCD"  # comma-separated endpoints, used when no --etcd is given
ENV_PASSWORD = "OVERLAY_ETCD_PASSWORD"  # used when --user is given without a password
CONNECT_TIMEOUT = 3.0  # per endpoint: a first round trip must come back within this
REQUEST_TIMEOUT = 5  # every later RPC


# --- input checks (before any connection) ---------------------------------------------------


def parse_vni(text: str, flag: str = "") -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or int(t) > VNI_MAX:
        where = f"{flag} " if flag else ""
        raise UserError(f"{where}{text!r} is not a VNI: write an integer from 0 to {VNI_MAX}, e.g. 42")
    return int(t)


def parse_mac(text: str) -> int:
    try:
        return unicast_mac(text)
    except ValueError as e:
        raise UserError(f"--mac {e}") from None


def parse_host_id(text: str) -> str:
    from overlay.core.registry import HOST_ID, HOST_ID_FORM

    if not HOST_ID.match(text):
        raise UserError(f"--host {text!r} is not a host id: {HOST_ID_FORM}, e.g. h1")
    return text


def parse_ips(texts: list[str]) -> tuple[list[str], list[str]]:
    """--ip values (each may hold several, comma-separated) -> (IPv4 list, IPv6 list), normalized."""
    v4: list[str] = []
    v6: list[str] = []
    for text in texts:
        for item in filter(None, (s.strip() for s in text.split(","))):
            try:
                ip = ipaddress.ip_address(item)
            except ValueError:
                raise UserError(
                    f"--ip {item!r} is not an IP address: write an IPv4 (198.19.0.5) or "
                    f"IPv6 (fd00::5) address, without a prefix length"
                ) from None
            bucket = v4 if ip.version == 4 else v6
            if str(ip) not in bucket:
                bucket.append(str(ip))
    return v4, v6


def parse_subnet(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text.strip()))
    except ValueError as e:
        if "host bits" in str(e):
            net = ipaddress.IPv4Network(text.strip(), strict=False)
            raise UserError(f"--subnet {text} has host bits set: write the network, {net}") from None
        raise UserError(f"--subnet {text!r} is not an IPv4 network: write A.B.C.D/LEN, e.g. 198.19.42.0/24") from None


def parse_gateway(text: str, subnet: str | None, version: int = 4) -> str:
    """``--gateway`` (``--gateway6`` with version 6): a host address of the network's subnet."""
    flag, of, example = (
        ("--gateway", "--subnet", "198.19.42.1") if version == 4 else ("--gateway6", "--subnet6", "2001:2:0:42::1")
    )
    try:
        address = ipaddress.ip_address(text.strip())
        if address.version != version:
            raise ValueError(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not an IPv{version} address like {example}") from None
    if subnet is None:
        raise UserError(f"{flag} needs {of} (the gateway is an address in it)")
    network = ipaddress.ip_network(subnet)
    host = address != network.network_address and (version == 6 or address != network.broadcast_address)
    if address not in network or not host:
        raise UserError(f"{flag} {address} is not a host address of {of} {subnet}")
    return str(address)


def parse_subnet6(text: str) -> str:
    from overlay.core.registry import SUBNET6_PREFIXES

    lo, hi = SUBNET6_PREFIXES
    try:
        net = ipaddress.IPv6Network(text.strip())
    except ValueError as e:
        if "host bits" in str(e):
            net = ipaddress.IPv6Network(text.strip(), strict=False)
            raise UserError(f"--subnet6 {text} has host bits set: write the network, {net}") from None
        raise UserError(
            f"--subnet6 {text!r} is not an IPv6 network: write V6/LEN (/{lo} to /{hi}), e.g. 2001:2:0:42::/64"
        ) from None
    if not lo <= net.prefixlen <= hi:
        raise UserError(f"--subnet6 {net} is a /{net.prefixlen}: use a /{lo} to /{hi}, e.g. 2001:2:0:42::/64")
    return str(net)


def parse_mtu(text: str) -> int:
    t = text.strip()
    if not (t.isascii() and t.isdigit()) or not MTU_MIN <= int(t) <= MTU_MAX:
        raise UserError(f"--mtu {text!r} is not an MTU: write an integer from {MTU_MIN} to {MTU_MAX}, e.g. 1450")
    return int(t)


def parse_name(text: str) -> str:
    if not text or len(text) > 63 or not text.isprintable():
        raise UserError(f"--name {text!r}: a network name is 1-63 printable characters, e.g. blue")
    return text


# --- connection -------------------------------------------------------------------------------


@dataclass
class Target:
    """Where and as whom to connect, and under which prefix; checked before connecting."""

    endpoints: list[str]
    prefix: str
    user: str | None = None
    password: str | None = None
    as_json: bool = False
    tls: Tls | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Target:
        from overlay.core.addresses import parse_endpoint

        given = args.etcd or [e for e in os.environ.get(ENV_ETCD, "").split(",") if e.strip()] or [DEFAULT_ETCD]
        endpoints = []
        for raw in given:
            url = raw.strip() if "://" in raw else "http://" + raw.strip()
            try:
                parse_endpoint(url)
            except ValueError as e:
                raise UserError(f"--etcd: {e}") from None
            if url.startswith("https://") and not getattr(args, "etcd_ca", None):
                raise UserError(
                    f"--etcd {raw}: an https:// endpoint needs --etcd-ca (the CA that signed etcd's certificate)"
                )
            endpoints.append(url)
        tls = None
        if getattr(args, "etcd_ca", None):
            from overlay.io.etcd import Tls

            if (args.etcd_cert is None) != (args.etcd_key is None):
                raise UserError("etcd client certificates need both --etcd-cert and --etcd-key")
            tls = Tls(args.etcd_ca, args.etcd_cert, args.etcd_key)
        prefix = args.prefix if args.prefix is not None else "/overlay/v1"
        if not prefix.startswith("/") or prefix.strip("/") == "" or "//" in prefix.rstrip("/"):
            raise UserError(f"--prefix {prefix!r} is not an etcd key prefix: write it like /overlay/v1")
        user, password = args.user, args.password
        if user is not None and password is None and ":" in user:
            user, password = user.split(":", 1)  # etcdctl's --user NAME:PASSWORD
        if user is not None and password is None:
            password = os.environ.get(ENV_PASSWORD)
            if password is None:
                raise UserError(f"--user {user} needs a password: --password PW, --user {user}:PW or {ENV_PASSWORD}")
        if password is not None and not user:
            raise UserError("--password without --user: give both, e.g. --user root --password PW")
        return cls(endpoints, prefix, user, password, bool(getattr(args, "json", False)), tls)


@dataclass
class Session:
    client: aetcd.Client
    url: str
    schema: Schema


def _is_unreachable(e: BaseException) -> bool:
    import aetcd.exceptions as x

    return isinstance(e, (x.ConnectionFailedError, x.ConnectionTimeoutError, TimeoutError, OSError))


def _refusal(e: BaseException, url: str, target: Target) -> RunError:
    """etcd answered but said no: a one-line RunError that says what to do."""
    text = str(e).removeprefix("etcdserver: ")
    if "user name is empty" in text:
        return RunError(f"etcd at {url} requires a login: give --user NAME --password PW")
    if "token" in text:
        return RunError(f"etcd at {url} rejected the login token ({text}): run the command again")
    if "authentication failed" in text:
        return RunError(f"etcd at {url} refused the login of user {target.user!r}: check --user and --password")
    if "authentication is not enabled" in text:
        return RunError(f"etcd at {url} has authentication off: leave out --user and --password")
    if "permission denied" in text:
        who = f"user {target.user!r}" if target.user else "an anonymous client"
        return RunError(f"etcd at {url}: permission denied for {who} under {target.prefix}")
    return RunError(f"etcd at {url} failed: {text or e.__class__.__name__}")


async def _connect(target: Target) -> Session:
    import asyncio

    from overlay.core.registry import Schema
    from overlay.io.etcd import EtcdError, open_client

    schema = Schema(target.prefix)
    for url in target.endpoints:
        try:
            client = await asyncio.wait_for(
                open_client(url, schema.prefix, target.user, target.password, target.tls), CONNECT_TIMEOUT
            )
        except EtcdError as e:  # the TLS files could not be read
            raise RunError(str(e)) from None
        except Exception as e:
            if _is_unreachable(e):
                continue
            raise _refusal(e, url, target) from None
        return Session(client, url, schema)
    raise RunError(f"no etcd answered at {', '.join(target.endpoints)}: start etcd or give --etcd")


async def _close(client: aetcd.Client) -> None:
    import asyncio

    try:
        await asyncio.wait_for(client.close(), 2)
    except Exception:
        pass


def run(target: Target, action: Callable[[Session], Awaitable[Any]]) -> Any:
    """Connect, run ``action``, close; etcd failures as one-line RunErrors."""
    import asyncio

    async def main() -> Any:
        session = await _connect(target)
        try:
            return await action(session)
        except (RunError, UserError):
            raise
        except Exception as e:
            import aetcd.exceptions

            if _is_unreachable(e):
                raise RunError(f"etcd at {session.url} stopped answering: {e or e.__class__.__name__}") from None
            if isinstance(e, aetcd.exceptions.ClientError):
                raise _refusal(e, session.url, target) from None
            raise
        finally:
            await _close(session.client)

    return asyncio.run(main())


# --- reading the registry ---------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything under the prefix at one revision, typed, with each key's lease (0: none)."""

    networks: dict[int, Network] = field(default_factory=dict)
    hosts: dict[str, tuple[Host, int]] = field(default_factory=dict)
    members: dict[int, dict[str, int]] = field(default_factory=dict)  # vni -> host -> lease
    endpoints: dict[tuple[int, int], tuple[Endpoint, int]] = field(default_factory=dict)  # (vni, mac)


def warn(text: str) -> None:
    print(f"overlay: warning: {text}", file=sys.stderr)


async def read(s: Session, under: str = "") -> Snapshot:
    """Read ``<prefix>/<under>`` (everything by default); a key or value outside the schema is
    reported on stderr and skipped, as the agents skip it."""
    from overlay.core.registry import EndpointKey, HostKey, MemberKey, NetworkKey

    result = await s.client.get_prefix(f"{s.schema.prefix}/{under}".encode())
    snap = Snapshot()
    for kv in result:
        raw_key = kv.key.decode(errors="replace")
        k = s.schema.parse_key(raw_key)
        if k is None:
            warn(f"ignoring {raw_key}: not a key of the registry schema")
            continue
        try:
            value = s.schema.decode(k, kv.value)
        except ValueError as e:
            warn(f"ignoring {raw_key}: {e} (agents ignore it too)")
            continue
        if isinstance(k, NetworkKey):
            snap.networks[k.vni] = value  # type: ignore[assignment]
        elif isinstance(k, HostKey):
            snap.hosts[k.host] = (value, kv.lease)  # type: ignore[assignment]
        elif isinstance(k, MemberKey):
            snap.members.setdefault(k.vni, {})[k.host] = kv.lease
        elif isinstance(k, EndpointKey):
            snap.endpoints[(k.vni, k.mac)] = (value, kv.lease)  # type: ignore[assignment]
    return snap


def lease_str(lease: int) -> str | None:
    """A lease id as etcdctl prints it (``lease 694d7b1f2a6c7c0a granted``); None for no lease."""
    return f"{lease:016x}" if lease else None


def endpoint_json(vni: int, mac: int, ep: Endpoint, lease: int) -> dict[str, Any]:
    from overlay.core.wire import mac_to_str

    return {
        "vni": vni,
        "mac": mac_to_str(mac),
        "host": ep.host,
        "ipv4": list(ep.ipv4),
        "ipv6": list(ep.ipv6),
        "lease": lease_str(lease),
        "static": not lease,
        "ports": list(ep.ports),  # exposed ports, "80/tcp" (attach --expose, CNI portMappings)
    }


def table(headers: list[str], rows: list[list[Any]], right: frozenset[int] | set[int] = frozenset()) -> str:
    cells = [headers] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(line.rstrip())
    return "\n".join(lines)


def emit(target: Target, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if target.as_json else human)


# --- overlay net ------------------------------------------------------------------------------


def cmd_net_create(args: argparse.Namespace) -> int:
    from overlay.core.registry import Network, NetworkKey, check

    vni = parse_vni(args.vni)
    name = parse_name(args.name) if args.name is not None else f"net{vni}"
    subnet = parse_subnet(args.subnet) if args.subnet is not None else None
    mtu = parse_mtu(args.mtu) if args.mtu is not None else None
    gateway = parse_gateway(args.gateway, subnet) if args.gateway is not None else None
    subnet6 = parse_subnet6(args.subnet6) if args.subnet6 is not None else None
    gateway6 = parse_gateway(args.gateway6, subnet6, 6) if args.gateway6 is not None else None
    encrypted = bool(args.encrypted)
    network = Network(
        vni=vni,
        name=name,
        subnet=subnet,
        mtu=mtu,
        gateway=gateway,
        subnet6=subnet6,
        gateway6=gateway6,
        encrypted=encrypted,
        nat=args.nat,
    )
    check(NetworkKey(vni), network)
    if args.force and not encrypted:
        raise UserError("--force goes with --encrypted (create it even if member hosts have no key)")
    if args.nat and gateway is None and gateway6 is None:
        warn(
            f"network {vni} has no --gateway: containers have no route out, so --nat has no effect "
            f"until it has one (the gateway is where their traffic is masqueraded)"
        )
    target = Target.from_args(args)

    async def action(s: Session) -> None:
        key = s.schema.key(NetworkKey(vni)).encode()
        t = s.client.transactions
        for _ in range(RETRIES):
            exists = RunError(
                f"network {vni} exists ({s.schema.key(NetworkKey(vni))}): "
                f"'overlay net ls' shows it, 'overlay net rm {vni}' removes it"
                + (f", 'overlay net set {vni} --encrypted' encrypts it" if encrypted else "")
            )
            guard = []
            if encrypted and not args.force:
                view = await read_members(s, vni)
                if view.network is not None:
                    raise exists
                refuse_unkeyed(vni, view, "created encrypted")
                guard = view.guard
            ok, _ = await s.client.transaction(
                compare=[t.create(key) == 0, *guard], success=[t.put(key, s.schema.encode(network))], failure=[]
            )
            if ok:
                return
            if not guard or await s.client.get(key) is not None:
                raise exists
        raise RunError(f"the members of network {vni} kept changing while it was being created: run the command again")

    run(target, action)
    data = {
        "vni": vni,
        "name": name,
        "subnet": subnet,
        "mtu": mtu,
        "gateway": gateway,
        "subnet6": subnet6,
        "gateway6": gateway6,
        "encrypted": encrypted,
        "nat": network.masquerades,
    }
    nat = (
        f", egress NAT {'on' if network.masquerades else 'off'}"
        if args.nat is not None or gateway is not None or gateway6 is not None
        else ""
    )
    emit(
        target,
        data,
        f"created {'encrypted ' if encrypted else ''}network {vni} ({name}, subnet {subnet or '-'}, mtu {mtu or '-'}"
        f"{', gateway ' + gateway if gateway else ''}{', subnet6 ' + subnet6 if subnet6 else ''}"
        f"{', gateway6 ' + gateway6 if gateway6 else ''}{nat})",
    )
    return 0


RETRIES = 5  # reads and compare-and-sets before giving up on a registry that keeps changing
GUARD_HOSTS_MAX = 100  # per-host compares up to this many members, then one over all of hosts/ (etcd: 128 ops)


@dataclass
class Members:
    """A network's definition, members and their host keys, read at one revision; ``guard``: the
    compares that hold while none of them changed since (for the write that depends on them)."""

    network: Any  # the network key's aetcd KeyValue, None if not defined
    members: list[str]
    unkeyed: list[str]  # members whose host value has no pubkey (or no host value at all)
    guard: list[Any]


async def read_members(s: Session, vni: int) -> Members:
    from aetcd.utils import prefix_range_end

    from overlay.core.registry import HostKey, MemberKey, NetworkKey

    t = s.client.transactions
    net_key = s.schema.key(NetworkKey(vni)).encode()
    under = (s.schema.key(NetworkKey(vni)) + "/members/").encode()
    hosts_under = f"{s.schema.prefix}/hosts/".encode()
    _, (net, member_kvs, host_kvs) = await s.client.transaction(
        compare=[],
        success=[
            t.get(net_key),
            t.get(under, prefix_range_end(under)),
            t.get(hosts_under, prefix_range_end(hosts_under)),
        ],
        failure=[],
    )
    seen = [kv for _, kv in [*net, *member_kvs, *host_kvs]]
    newest = max((kv.mod_revision for kv in seen), default=0)  # anything written later is newer than this
    members = []
    for _, kv in member_kvs:
        k = s.schema.parse_key(kv.key.decode(errors="replace"))
        if isinstance(k, MemberKey):
            members.append(k.host)
    hosts: dict[str, Any] = {}
    for _, kv in host_kvs:
        k = s.schema.parse_key(kv.key.decode(errors="replace"))
        if isinstance(k, HostKey):
            try:
                hosts[k.host] = s.schema.decode(k, kv.value)
            except ValueError:
                pass  # not a host value the agents take: as good as none
    unkeyed = sorted(h for h in members if hosts.get(h) is None or hosts[h].pubkey is None)
    guard = [t.mod(under, prefix_range_end(under)) < newest + 1]  # no member joined or changed
    if len(members) <= GUARD_HOSTS_MAX:
        guard += [t.mod(s.schema.key(HostKey(h)).encode()) < newest + 1 for h in members]
    else:
        guard.append(t.mod(hosts_under, prefix_range_end(hosts_under)) < newest + 1)
    return Members(net[0][1] if net else None, sorted(members), unkeyed, guard)


def refuse_unkeyed(vni: int, view: Members, doing: str) -> None:
    if view.unkeyed:
        n = len(view.unkeyed)
        raise RunError(
            f"network {vni} cannot be {doing}: member host{'s' if n != 1 else ''} {', '.join(view.unkeyed)} "
            f"publish{'es' if n == 1 else ''} no pubkey (an older agent, which cannot encrypt and would lose "
            f"the network's traffic): upgrade {'them' if n != 1 else 'it'} first, or give --force"
        )


def cmd_net_set(args: argparse.Namespace) -> int:
    import msgspec

    from overlay.core.registry import Network, NetworkKey

    vni = parse_vni(args.vni)
    if args.encrypted is None and args.nat is None:
        raise UserError(
            f"nothing to change: give --encrypted or --no-encrypted, --nat or --no-nat, "
            f"e.g. overlay net set {vni} --encrypted"
        )
    want: bool | None = args.encrypted
    want_nat: bool | None = args.nat
    if args.force and not want:
        raise UserError("--force goes with --encrypted (encrypt even if member hosts have no key)")
    target = Target.from_args(args)

    async def action(s: Session) -> dict[str, Any]:
        key = s.schema.key(NetworkKey(vni))
        t = s.client.transactions
        for _ in range(RETRIES):
            view = await read_members(s, vni)
            if view.network is None:
                raise RunError(
                    f"network {vni} does not exist under {s.schema.prefix}: 'overlay net create {vni}' defines it"
                )
            try:
                fields = json.loads(view.network.value)
                network = s.schema.decode(NetworkKey(vni), view.network.value)
                assert isinstance(network, Network) and isinstance(fields, dict)
            except ValueError as e:
                raise RunError(
                    f"{key} holds a value agents refuse ({e}): fix it with etcdctl put, or 'overlay net rm {vni}'"
                ) from None
            encrypting = want is not None and network.encrypted != want
            nat_changing = want_nat is not None and network.nat != want_nat
            after = msgspec.structs.replace(network, nat=network.nat if want_nat is None else want_nat)
            result = {
                "vni": vni,
                "encrypted": network.encrypted if want is None else want,
                "changed": encrypting or nat_changing,
                "members": view.members,
                "nat": after.masquerades,
                "encryption_changed": encrypting,
                "nat_changed": nat_changing,
            }
            if not result["changed"]:
                return result
            if encrypting and want and not args.force:
                refuse_unkeyed(vni, view, "encrypted")
            if encrypting and want:
                fields["encrypted"] = True
            elif encrypting:
                fields.pop("encrypted", None)  # the plaintext form, as before encryption existed
            if nat_changing:
                fields["nat"] = want_nat
            raw = json.dumps(fields, separators=(",", ":")).encode()
            s.schema.decode(NetworkKey(vni), raw)  # still a good value
            compare = [t.mod(key.encode()) == view.network.mod_revision]
            if encrypting and want and not args.force:
                compare += view.guard
            ok, _ = await s.client.transaction(
                compare=compare, success=[t.put(key.encode(), raw, view.network.lease or None)], failure=[]
            )
            if ok:
                return result
        raise RunError(f"network {vni} or its members kept changing while it was being written: run the command again")

    data = run(target, action)
    encryption_changed, nat_changed = data.pop("encryption_changed"), data.pop("nat_changed")
    said = []
    if want is not None:
        state = "encrypted" if want else "plaintext (not encrypted)"
        said.append(f"is now {state}" if encryption_changed else f"is already {state}")
    if want_nat is not None:
        nat = f"egress NAT {'on' if want_nat else 'off'}"
        said.append(f"now has {nat}" if nat_changed else f"already has {nat}")
    emit(target, data, f"network {vni} {' and '.join(said)}{'' if data['changed'] else ': nothing changed'}")
    return 0


def cmd_net_ls(args: argparse.Namespace) -> int:
    target = Target.from_args(args)

    async def action(s: Session) -> Snapshot:
        return await read(s, "networks/")

    snap: Snapshot = run(target, action)
    vnis = sorted(set(snap.networks) | set(snap.members) | {vni for vni, _ in snap.endpoints})
    rows = []
    for vni in vnis:
        net = snap.networks.get(vni)
        rows.append(
            {
                "vni": vni,
                "name": net.name if net else None,
                "subnet": net.subnet if net else None,
                "mtu": net.mtu if net else None,
                "subnet6": net.subnet6 if net else None,
                "encrypted": net.encrypted if net else None,
                "defined": net is not None,
                "members": len(snap.members.get(vni, {})),
                "endpoints": sum(1 for v, _ in snap.endpoints if v == vni),
                "gateway": net.gateway if net else None,
                "gateway6": net.gateway6 if net else None,
                "nat": net.masquerades if net else None,  # egress NAT, the default resolved
            }
        )
    human = table(
        ["VNI", "NAME", "SUBNET", "SUBNET6", "MTU", "ENCRYPTED", "MEMBERS", "ENDPOINTS", "GATEWAY", "NAT"],
        [
            [
                r["vni"],
                r["name"] if r["defined"] else "(not defined)",
                r["subnet"],
                r["subnet6"],
                r["mtu"],
                None if r["encrypted"] is None else "yes" if r["encrypted"] else "no",
                r["members"],
                r["endpoints"],
                ",".join(str(g) for g in (r["gateway"], r["gateway6"]) if g),
                None if r["nat"] is None else "on" if r["nat"] else "off",
            ]
            for r in rows
        ],
        right={0, 4, 6, 7},
    )
    if not rows:
        human += f"\n(no networks under {target.prefix}: 'overlay net create VNI' defines one)"
    emit(target, rows, human)
    return 0


def cmd_net_rm(args: argparse.Namespace) -> int:
    from aetcd.utils import prefix_range_end  # only reached for a real removal

    from overlay.core.registry import EndpointKey, MemberKey, NetworkKey

    vni = parse_vni(args.vni)
    target = Target.from_args(args)

    async def action(s: Session) -> dict[str, Any]:
        key = s.schema.key(NetworkKey(vni)).encode()
        under = (s.schema.key(NetworkKey(vni)) + "/").encode()
        members = (s.schema.key(NetworkKey(vni)) + "/members/").encode()
        t = s.client.transactions
        compare = [] if args.force else [t.create(members, prefix_range_end(members)) == 0]
        ok, responses = await s.client.transaction(
            compare=compare,
            success=[t.delete(under, prefix_range_end(under), prev_kv=True), t.delete(key, prev_kv=True)],
            failure=[t.get(members, prefix_range_end(members))],
        )
        if not ok:
            hosts = sorted(kv.key.decode(errors="replace").rsplit("/", 1)[-1] for _, kv in responses[0])
            raise RunError(
                f"network {vni} has {len(hosts)} member{'s' if len(hosts) != 1 else ''} "
                f"({', '.join(hosts)}): their agents use it; stop them first, or give --force"
            )
        gone = [kv for r in responses for kv in r.response_delete_range.prev_kvs]
        if not gone:
            raise RunError(f"network {vni} does not exist under {s.schema.prefix} ('overlay net ls' lists them)")
        kinds = [s.schema.parse_key(kv.key.decode(errors="replace")) for kv in gone]
        return {
            "vni": vni,
            "deleted_keys": len(gone),
            "defined": any(isinstance(k, NetworkKey) for k in kinds),
            "members": sum(isinstance(k, MemberKey) for k in kinds),
            "endpoints": sum(isinstance(k, EndpointKey) for k in kinds),
        }

    data = run(target, action)
    what = "removed network" if data["defined"] else "removed the keys of undefined network"
    emit(
        target,
        data,
        f"{what} {vni} ({data['deleted_keys']} keys: {data['members']} members, {data['endpoints']} endpoints)",
    )
    return 0


def parse_net(text: str) -> str:
    """NET of ``net join``/``leave``: a VNI or a network's name, as ``overlay attach --net``."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        return str(parse_vni(t))
    if not t or len(t) > 63 or not t.isprintable():
        raise UserError(f"{text!r} is not a network: give its name (e.g. blue) or its VNI (e.g. 42)")
    return t


def cmd_net_join(args: argparse.Namespace) -> int:
    from overlay.cmd.cli import _ask  # the local agent's control socket, as status and attach use it

    answer = _ask("net_join", args.tap, 60.0, net=parse_net(args.net))
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"{'joined' if answer['joined'] else 'already joined'} network {answer['name']} (VNI {answer['vni']})")
    return 0


def cmd_net_leave(args: argparse.Namespace) -> int:
    from overlay.cmd.cli import _ask

    answer = _ask("net_leave", args.tap, 60.0, net=parse_net(args.net))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer["left"]:
        print(f"left network {answer['name']} (VNI {answer['vni']})")
    else:
        print(f"network {answer['name']} (VNI {answer['vni']}) was not joined here: nothing to leave")
    return 0


# --- overlay host -----------------------------------------------------------------------------


def cmd_host_ls(args: argparse.Namespace) -> int:
    import asyncio

    from overlay.core.keys import fingerprint, parse_public

    target = Target.from_args(args)

    async def action(s: Session) -> tuple[Snapshot, dict[int, int]]:
        snap = await read(s)
        leases = sorted({lease for _, lease in snap.hosts.values() if lease})
        infos = await asyncio.gather(*(s.client.get_lease_info(lease, keys=False) for lease in leases))
        return snap, {lease: int(info.TTL) for lease, info in zip(leases, infos)}

    snap, ttls = run(target, action)
    named = set(snap.hosts)
    for hosts in snap.members.values():
        named |= set(hosts)
    named |= {ep.host for ep, _ in snap.endpoints.values()}
    probes = local_probes()
    rows = []
    for host_id in sorted(named):
        host, lease = snap.hosts.get(host_id, (None, 0))
        ttl = ttls.get(lease) if lease else None
        alive = host is not None and (ttl is None or ttl >= 0)
        probe = probes.get(host_id)
        rows.append(
            {
                "host": host_id,
                "address": host.address if host else None,
                "port": host.port if host else None,
                "alive": alive,
                "lease": lease_str(lease),
                "ttl": ttl if alive else None,
                "networks": sorted(vni for vni, hosts in snap.members.items() if host_id in hosts),
                "rtt_ms": probe.srtt_ms if probe else None,
                "loss": probe.loss if probe else None,
                "reachable": probe.reachable if probe else None,
                "address6": host.address6 if host else None,
                "pubkey": host.pubkey if host else None,
            }
        )
    human = table(
        ["HOST", "VTEP", "ALIVE", "TTL", "NETWORKS", "KEY", "RTT", "LOSS", "PATH"],
        [
            [
                r["host"],
                " ".join(format_address(a, r["port"]) for a in (r["address"], r["address6"]) if a) or None,
                "yes" if r["alive"] else "no",
                (f"{r['ttl']} s" if r["ttl"] is not None else "no lease" if r["alive"] else None),
                ",".join(map(str, r["networks"])),
                fingerprint(parse_public(r["pubkey"])) if r["pubkey"] else None,
                f"{r['rtt_ms']:.3f} ms" if r["rtt_ms"] is not None else None,
                f"{r['loss']:.0%}" if r["loss"] is not None else None,
                None if r["reachable"] is None else "ok" if r["reachable"] else "UNREACHABLE",
            ]
            for r in rows
        ],
    )
    if probes:
        human += "\n(RTT, LOSS, PATH: underlay probes from the agent on this host)"
    if not rows:
        human += f"\n(no hosts under {target.prefix}: an agent registers its host when it starts with --etcd)"
    emit(target, rows, human)
    return 0


def local_probes() -> dict[str, ProbeStatus]:
    """The peer probes of the agent running in this network namespace, if one runs: it sees
    the underlay path from here, which etcd cannot know."""
    from overlay.core.status import Status
    from overlay.io import control

    try:
        agents = control.running_agents()
        if len(agents) != 1:
            return {}
        return Status.from_json(control.request("status", agents[0], 2.0)).probes
    except (control.ControlError, OSError, ValueError):  # no agent, or one that answers something else
        return {}


# --- overlay endpoint -------------------------------------------------------------------------


def cmd_endpoint_ls(args: argparse.Namespace) -> int:
    vni = parse_vni(args.net, "--net") if args.net is not None else None
    target = Target.from_args(args)

    async def action(s: Session) -> Snapshot:
        return await read(s, "networks/" if vni is None else f"networks/{vni}/endpoints/")

    snap: Snapshot = run(target, action)
    rows = [endpoint_json(v, mac, ep, lease) for (v, mac), (ep, lease) in sorted(snap.endpoints.items())]
    human = table(
        ["VNI", "MAC", "HOST", "IPV4", "IPV6", "LEASE", "PORTS"],
        [
            [
                r["vni"],
                r["mac"],
                r["host"],
                ",".join(r["ipv4"]),
                ",".join(r["ipv6"]),
                r["lease"] or "static",
                ",".join(r["ports"]),
            ]
            for r in rows
        ],
        right={0},
    )
    if not rows:
        human += "\n(no endpoints" + (f" on network {vni})" if vni is not None else ")")
    emit(target, rows, human)
    return 0


def cmd_endpoint_add(args: argparse.Namespace) -> int:
    from overlay.core.registry import Endpoint, EndpointKey, HostKey, NetworkKey, check

    vni = parse_vni(args.net, "--net")
    mac = parse_mac(args.mac)
    host = parse_host_id(args.host)
    ipv4, ipv6 = parse_ips(args.ip or [])
    endpoint = Endpoint(host=host, ipv4=ipv4, ipv6=ipv6)
    check(EndpointKey(vni, mac), endpoint)
    target = Target.from_args(args)

    async def action(s: Session) -> bool:
        key = s.schema.key(EndpointKey(vni, mac))
        t = s.client.transactions
        old = await s.client.get(key.encode())
        if old is not None and old.lease:
            raise RunError(
                f"endpoint {key.rsplit('/', 1)[-1]} on network {vni} is held by an agent under lease "
                f"{lease_str(old.lease)}: it is not the operator's to change; 'overlay endpoint rm' "
                f"it first to take it over"
            )
        compare = [t.create(key.encode()) == 0] if old is None else [t.mod(key.encode()) == old.mod_revision]
        ok, _ = await s.client.transaction(
            compare=compare, success=[t.put(key.encode(), s.schema.encode(endpoint))], failure=[]
        )
        if not ok:
            raise RunError(f"{key} changed while it was being written: run the command again")
        if await s.client.get(s.schema.key(HostKey(host)).encode()) is None:
            warn(
                f"host {host} is not registered ({s.schema.key(HostKey(host))} is absent): agents forward to "
                f"this endpoint once {host}'s agent runs"
            )
        if await s.client.get(s.schema.key(NetworkKey(vni)).encode()) is None:
            warn(f"network {vni} is not defined: 'overlay net create {vni}' defines it")
        return old is not None

    replaced = run(target, action)
    data = {**endpoint_json(vni, mac, endpoint, 0), "replaced": replaced}
    ips = ", ".join(ipv4 + ipv6) or "no addresses"
    emit(
        target,
        data,
        f"{'replaced' if replaced else 'added'} endpoint {data['mac']} on network {vni}: host {host}, {ips} (static)",
    )
    return 0


def cmd_endpoint_rm(args: argparse.Namespace) -> int:
    from overlay.core.registry import EndpointKey

    vni = parse_vni(args.net, "--net")
    mac = parse_mac(args.mac)
    target = Target.from_args(args)

    async def action(s: Session) -> dict[str, Any]:
        key = s.schema.key(EndpointKey(vni, mac))
        gone = await s.client.delete(key.encode(), prev_kv=True)
        if gone is None:
            raise RunError(
                f"no endpoint {key.rsplit('/', 1)[-1]} on network {vni} ('overlay endpoint ls --net {vni}' lists them)"
            )
        prev = gone.prev_kv
        try:
            ep = s.schema.decode(EndpointKey(vni, mac), prev.value)
        except ValueError:
            return {
                "vni": vni,
                "mac": key.rsplit("/", 1)[-1],
                "host": None,
                "ipv4": [],
                "ipv6": [],
                "lease": lease_str(prev.lease),
                "static": not prev.lease,
            }
        return endpoint_json(vni, mac, ep, prev.lease)  # type: ignore[arg-type]

    data = run(target, action)
    owner = f"held by lease {data['lease']}" if data["lease"] else "static"
    emit(target, data, f"removed endpoint {data['mac']} on network {vni} (host {data['host'] or '?'}, {owner})")
    return 0


# --- the parsers ------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("etcd connection")
    g.add_argument(
        "--etcd",
        metavar="URL",
        action="append",
        help=f"etcd endpoint, e.g. http://198.18.0.250:2379; repeat for each member of a cluster, tried in "
        f"turn (default: ${ENV_ETCD}, comma-separated, else {DEFAULT_ETCD})",
    )
    g.add_argument("--user", metavar="NAME[:PW]", help="etcd user, when etcd has authentication on")
    g.add_argument("--password", metavar="PW", help=f"the user's password (or ${ENV_PASSWORD}, kept out of ps)")
    g.add_argument("--prefix", help="registry key prefix (default /overlay/v1)")
    g.add_argument(
        "--etcd-ca", dest="etcd_ca", metavar="FILE", help="TLS: the CA that signed etcd's certificate (https://)"
    )
    g.add_argument(
        "--etcd-cert", dest="etcd_cert", metavar="FILE", help="TLS: client certificate, when etcd asks for one"
    )
    g.add_argument("--etcd-key", dest="etcd_key", metavar="FILE", help="TLS: the client certificate's key")
    common.add_argument("--json", action="store_true", help="machine-readable output (shapes in README.md)")
    return common


def _group(sub: Any, name: str, help_text: str, description: str, epilog: str) -> tuple[Any, Any]:
    p = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def show_help(_: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=show_help)
    return p, p.add_subparsers(title="actions", metavar="ACTION")


def _leaf(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
    description: str,
    epilog: str,
    common: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        parents=[common],
        help=help_text,
        description=textwrap.fill(description, 88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    assert isinstance(p, argparse.ArgumentParser)
    return p


ENCRYPTED_HELP = (
    "encrypt the network: every datagram between its hosts authenticated and encrypted with keys "
    "from a handshake between the hosts' keys ('overlay key show'); plaintext VXLAN for it is dropped"
)

NAT_HELP = (
    "egress NAT: containers' traffic leaving the overlay through the gateway is masqueraded behind the "
    'host\'s address ("nat": true; without --nat/--no-nat nothing is written and the default holds: on '
    "when the network has a gateway)"
)


def nat_flags(p: argparse.ArgumentParser) -> None:
    onoff = p.add_mutually_exclusive_group()
    onoff.add_argument("--nat", dest="nat", action="store_const", const=True, help=NAT_HELP)
    onoff.add_argument(
        "--no-nat",
        dest="nat",
        action="store_const",
        const=False,
        help='no egress NAT ("nat": false): containers\' traffic leaves with their own addresses (routed), '
        "for underlays that route the overlay's subnets",
    )


REGISTRY_NOTE = (
    "These commands read and write the etcd registry (DESIGN.md): the same keys and values "
    "as etcdctl put/del under the prefix, which every agent applies."
)


def add_commands(sub: Any) -> None:
    """Register ``net``, ``host`` and ``endpoint`` on the ``overlay`` command's subparsers."""
    common = _common()

    _, net = _group(
        sub,
        "net",
        "define, change, list and remove networks (VNIs) in etcd",
        "Networks in the etcd registry: <prefix>/networks/<vni>. " + REGISTRY_NOTE,
        "examples:\n"
        "  overlay net create 42 --name blue --subnet 198.19.42.0/24 --mtu 1450\n"
        "  overlay net create 43 --encrypted\n"
        "  overlay net set 42 --encrypted\n"
        "  overlay net create 44 --subnet 198.19.44.0/24 --gateway 198.19.44.1 --no-nat   # routed, not masqueraded\n"
        "  overlay net ls --etcd http://198.18.0.250:2379\n"
        "  overlay net rm 42\n"
        "  overlay net join blue     # this host's agent serves network blue from now on (no etcd flags: it asks the agent)\n"
        "  overlay net leave blue",
    )
    p = _leaf(
        net,
        "create",
        cmd_net_create,
        "define a network",
        "Define network VNI: write <prefix>/networks/<vni> if it does not exist (compare-and-create; "
        "an existing network is an error, never overwritten). Agents that join the VNI use its MTU "
        "and subnet.",
        "examples:\n"
        "  overlay net create 42\n"
        "  overlay net create 42 --name blue --subnet 198.19.42.0/24 --mtu 1450\n"
        "  overlay net create 42 --subnet 198.19.42.0/24 --subnet6 2001:2:0:42::/64   # dual stack\n"
        "  overlay net create 42 --encrypted   # every datagram between its hosts sealed\n"
        "  overlay net create 42 --subnet 198.19.42.0/24 --gateway 198.19.42.1   # egress NAT on (the default)\n"
        "  overlay net create 42 --subnet 198.19.42.0/24 --gateway 198.19.42.1 --no-nat\n"
        "  same as: etcdctl put /overlay/v1/networks/42 "
        '\'{"vni":42,"name":"blue","subnet":"198.19.42.0/24","mtu":1450}\'',
        common,
    )
    p.add_argument("vni", metavar="VNI", help="VXLAN network identifier, 0-16777215")
    p.add_argument("--name", help="a name for people (default net<VNI>)")
    p.add_argument("--subnet", metavar="A.B.C.D/LEN", help="the overlay's IPv4 subnet, e.g. 198.19.42.0/24")
    p.add_argument("--mtu", help="the overlay's MTU, 68-65485 (default: each agent's underlay MTU minus 50)")
    p.add_argument(
        "--gateway",
        metavar="A.B.C.D",
        help="containers' default route on this network (an address in --subnet; never allocated)",
    )
    p.add_argument(
        "--subnet6",
        metavar="V6/LEN",
        help="the overlay's IPv6 subnet, /64 to /120, e.g. 2001:2:0:42::/64: containers get an address of each family",
    )
    p.add_argument(
        "--gateway6",
        metavar="V6",
        help="containers' IPv6 default route on this network (an address in --subnet6; never allocated)",
    )
    p.add_argument("--encrypted", action="store_true", help=ENCRYPTED_HELP)
    p.add_argument("--force", action="store_true", help="with --encrypted: even if member hosts publish no pubkey")
    nat_flags(p)
    p = _leaf(
        net,
        "set",
        cmd_net_set,
        "change a network: encrypt it or not, masquerade its egress or not",
        "Change network VNI in place: a compare-and-set of <prefix>/networks/<vni> on the value read "
        "(fields this tool does not know are kept). --encrypted is refused while a member host publishes "
        "no pubkey in hosts/<id> (an older agent, which cannot encrypt: it would lose the network's "
        "traffic), unless --force; the check and the write are one transaction. Agents apply the change "
        "as it comes: once encrypted, plaintext VXLAN for the VNI is dropped.",
        "examples:\n"
        "  overlay net set 42 --encrypted\n"
        "  overlay net set 42 --encrypted --force   # even with old agents among its members (they lose it)\n"
        "  overlay net set 42 --no-encrypted        # back to plaintext VXLAN (RFC 7348)\n"
        "  overlay net set 42 --no-nat              # containers' traffic leaves with their own addresses\n"
        '  same as: etcdctl put /overlay/v1/networks/42 \'{"vni":42,...,"encrypted":true}\'',
        common,
    )
    p.add_argument("vni", metavar="VNI", help="the network's VNI")
    onoff = p.add_mutually_exclusive_group()
    onoff.add_argument("--encrypted", dest="encrypted", action="store_const", const=True, help=ENCRYPTED_HELP)
    onoff.add_argument(
        "--no-encrypted",
        dest="encrypted",
        action="store_const",
        const=False,
        help="plaintext VXLAN again (the field is removed: the value is as before encryption existed)",
    )
    p.add_argument("--force", action="store_true", help="with --encrypted: even if member hosts publish no pubkey")
    nat_flags(p)
    _leaf(
        net,
        "ls",
        cmd_net_ls,
        "list networks",
        "List the networks: VNI, name, subnet, subnet6, MTU, whether it is encrypted, how many hosts are "
        "members and how many endpoints it has, its gateway(s) and whether its egress is masqueraded (NAT: "
        "on/off, the default resolved: on when it has a gateway). A VNI with members or endpoints but no "
        "definition shows as '(not defined)'.",
        "examples:\n  overlay net ls\n  overlay net ls --json",
        common,
    )
    p = _leaf(
        net,
        "rm",
        cmd_net_rm,
        "remove a network, its members and endpoints",
        "Remove network VNI: its key and every key under it (members, endpoints), in one transaction. "
        "Refused while any host is a member (an agent runs on it) unless --force.",
        "examples:\n"
        "  overlay net rm 42\n"
        "  overlay net rm 42 --force      # even with agents on it; they keep forwarding what they know\n"
        "  same as: etcdctl del --prefix /overlay/v1/networks/42/ && etcdctl del /overlay/v1/networks/42",
        common,
    )
    p.add_argument("vni", metavar="VNI", help="the network's VNI")
    p.add_argument("--force", action="store_true", help="remove it even while hosts are members")
    for name, func, text, description, examples in (
        (
            "join",
            cmd_net_join,
            "make this host's agent serve a network (on demand)",
            "Ask the agent running in this network namespace (its control socket, not etcd) to join network "
            "NET now: it makes the network's TAP and bridge, becomes a member in the registry and serves "
            "its distributed gateway. Joining a network joined already is not an error. 'overlay status' "
            "shows which networks were joined at start (--network) and which on demand.",
            "examples:\n  overlay net join blue\n  overlay net join 42 --json\n"
            "  ip netns exec h1 overlay net join blue   # the agent of lab host h1\n"
            "prints: joined network blue (VNI 42)   (or: already joined network blue (VNI 42))",
        ),
        (
            "leave",
            cmd_net_leave,
            "make this host's agent stop serving a network",
            "Ask the agent running in this network namespace (its control socket, not etcd) to leave network "
            "NET: its membership, TAP and bridge go. What the agent cannot leave (e.g. a network with "
            "containers attached here) it refuses in one line (exit 2). Leaving a network that is not "
            "joined is not an error.",
            "examples:\n  overlay net leave blue\n  overlay net leave 42 --json\nprints: left network blue (VNI 42)",
        ),
    ):
        p = net.add_parser(
            name,
            help=text,
            description=textwrap.fill(description, 88),
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("net", metavar="NET", help="the network's name or VNI")
        p.add_argument("--tap", help="which agent, when several run in this namespace")
        done = "joined" if name == "join" else "left"
        p.add_argument("--json", action="store_true", help=f'print {{"vni", "name", "{done}"}} (false: nothing to do)')
        p.set_defaults(func=func)

    _, host = _group(
        sub,
        "host",
        "list the hosts registered in etcd and whether they are alive",
        "Hosts in the etcd registry: <prefix>/hosts/<host-id>, written by each agent under its lease. " + REGISTRY_NOTE,
        "example:\n  overlay host ls",
    )
    _leaf(
        host,
        "ls",
        cmd_host_ls,
        "list hosts with liveness",
        "List hosts: id, VTEP address:port, alive, the lease's remaining TTL, the networks it is a member of, "
        "KEY: the fingerprint of its public key (first 8 characters of base64(sha256(pubkey)); '-': an agent "
        "that publishes none, which cannot join encrypted networks; --json gives the whole pubkey). "
        "A host key exists only while its agent keeps its lease alive, so a listed key means alive; when "
        "the agent dies the key goes within the lease TTL. Hosts that members or endpoints name but that "
        "have no key are listed as not alive.",
        "examples:\n  overlay host ls\n  overlay host ls --json --etcd http://198.18.0.250:2379",
        common,
    )

    _, ep = _group(
        sub,
        "endpoint",
        "list, add and remove endpoints (MAC -> host) in etcd",
        "Endpoints in the etcd registry: <prefix>/networks/<vni>/endpoints/<mac>, the host that "
        "owns a MAC and its addresses. Agents write their own under their lease; an operator's are "
        "written without one (static) and stay until removed. " + REGISTRY_NOTE,
        "examples:\n"
        "  overlay endpoint add --net 42 --mac 02:00:00:00:00:99 --host h2 --ip 198.19.42.99\n"
        "  overlay endpoint ls --net 42\n"
        "  overlay endpoint rm --net 42 --mac 02:00:00:00:00:99",
    )
    p = _leaf(
        ep,
        "ls",
        cmd_endpoint_ls,
        "list endpoints",
        "List endpoints: VNI, MAC, owning host, IPv4 and IPv6 addresses, the lease that holds it "
        "(an agent's) or 'static' (an operator's), and the ports its container exposes (PORTS, e.g. "
        "80/tcp,53/udp: 'overlay attach --expose', CNI portMappings; '-' when none).",
        "examples:\n  overlay endpoint ls\n  overlay endpoint ls --net 42 --json",
        common,
    )
    p.add_argument("--net", metavar="VNI", help="only this network's endpoints")
    p = _leaf(
        ep,
        "add",
        cmd_endpoint_add,
        "add (or change) a static endpoint",
        "Declare that MAC on network VNI is at host HOST: agents send its frames straight to that host's "
        "VTEP instead of flooding. Written without a lease (static: it stays until 'endpoint rm'). An "
        "existing static endpoint is replaced; one an agent holds under its lease is left alone. A host "
        "that is not registered yet is a warning, not an error.",
        "examples:\n"
        "  overlay endpoint add --net 42 --mac 02:00:00:00:00:99 --host h2\n"
        "  overlay endpoint add --net 42 --mac 02:00:00:00:00:99 --host h2 --ip 198.19.42.99 --ip fd00::99\n"
        "  same as: etcdctl put /overlay/v1/networks/42/endpoints/02:00:00:00:00:99 "
        '\'{"host":"h2","ipv4":["198.19.42.99"],"ipv6":[]}\'',
        common,
    )
    p.add_argument("--net", metavar="VNI", required=True, help="the network's VNI")
    p.add_argument("--mac", required=True, help="the endpoint's unicast MAC, e.g. 02:00:00:00:00:99")
    p.add_argument("--host", required=True, metavar="HOST", help="the host id the MAC is at, e.g. h2")
    p.add_argument(
        "--ip", metavar="ADDR", action="extend", nargs="+", help="its IPv4 or IPv6 address(es); repeat or list several"
    )
    p = _leaf(
        ep,
        "rm",
        cmd_endpoint_rm,
        "remove an endpoint",
        "Remove the endpoint MAC from network VNI (static or an agent's). Agents forget it and flood "
        "frames to it again.",
        "examples:\n"
        "  overlay endpoint rm --net 42 --mac 02:00:00:00:00:99\n"
        "  same as: etcdctl del /overlay/v1/networks/42/endpoints/02:00:00:00:00:99",
        common,
    )
    p.add_argument("--net", metavar="VNI", required=True, help="the network's VNI")
    p.add_argument("--mac", required=True, help="the endpoint's MAC")
