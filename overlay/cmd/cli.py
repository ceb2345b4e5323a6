"""The ``overlay`` command. Each subcommand is a small function here that parses flags, calls
into the package, and turns expected failures into one-line errors (exit status 1 for a
failure at run time, 2 for bad input), never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from overlay import __version__
from overlay.cmd.errors import RunError, UserError
from overlay.core.addresses import format_address
from overlay.core.status import Status
from overlay.fastpath import FastPathMissing, load

if TYPE_CHECKING:
    from overlay.io.keys import KeyFileError

# --- overlay agent --------------------------------------------------------------------------


def cmd_agent(args: argparse.Namespace) -> int:
    from overlay.core import config

    settings: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"--config {path}: {e.strerror}") from None
        settings.update(config.parse_toml(text, str(path)))
    for key in config.KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if args.key_file is not None:
        settings["key_file"] = os.path.abspath(args.key_file)  # a flag's path is from here; the file's must be absolute
    if args.docker_plugin_dir is not None:
        settings["docker_plugin_dir"] = os.path.abspath(args.docker_plugin_dir)  # as --key-file: from here
    if "etcd_password" not in settings and os.environ.get("OVERLAY_ETCD_PASSWORD"):
        settings["etcd_password"] = os.environ["OVERLAY_ETCD_PASSWORD"]
    cfg = config.build(settings)
    load()  # a missing fast path is one line, before anything imports it
    from overlay import agent

    try:
        agent.run(cfg)
    except agent.AgentUsageError as e:
        raise UserError(str(e)) from None
    except agent.AgentError as e:
        raise RunError(str(e)) from None
    return 0


def add_agent(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the overlay agent in the foreground",
        description=(
            "Run the overlay agent: create a TAP, carry its frames to the peers over VXLAN "
            "(UDP) and theirs back. Static mode: the peers are given here (--vni, --peer). "
            "etcd mode: peers and endpoints come from the registry (--etcd, --host-id, "
            "--network). Stops cleanly on SIGINT/SIGTERM, removing the TAP."
        ),
        epilog=(
            "static:  overlay agent --vni 42 --local 198.18.0.1 --peer 198.18.0.2 "
            "--peer 198.18.0.3 --tap ovl0 --address 198.19.0.1/24\n"
            "etcd:    overlay agent --etcd http://198.18.0.250:2379 --host-id h1 --local 198.18.0.1 "
            "--network 42 --address 198.19.42.1/24\n"
            "IPv6:    overlay agent --etcd http://[2001:2:0:1::fa]:2379 --host-id h1 --local 2001:2:0:1::1 --network 42\n"
            "dual:    overlay agent ... --local 198.18.0.1 --local6 2001:2:0:1::1   (IPv6 to peers that have it)\n"
            "encrypted (static): overlay agent --vni 42 --local 198.18.0.1 --peer 198.18.0.2 --encrypt "
            "--key-file /var/lib/overlay/static.key --peer-key 198.18.0.2=PUBKEY\n"
            "           (PUBKEY: what 'overlay key show' prints on 198.18.0.2; that host lists this one's the same way)\n"
            "encrypted (etcd):   overlay net create 42 --encrypted   (agents publish their keys themselves)\n"
            'Every flag can also be a key of the --config TOML file (peer = ["198.18.0.2"], '
            'peer_key = ["198.18.0.2=..."], encrypt = true); flags override the file.'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with the same keys as the flags")
    p.add_argument("--vni", help="VXLAN network identifier, 0-16777215 (required)")
    p.add_argument(
        "--local", metavar="IP", help="this host's underlay address, IPv4 or IPv6: the VTEP address (required)"
    )
    p.add_argument(
        "--local6",
        metavar="V6",
        help="a dual-stack host's IPv6 underlay address, beside an IPv4 --local (published as address6)",
    )
    p.add_argument(
        "--underlay-family",
        dest="underlay_family",
        choices=["auto", "4", "6"],
        help="the family to reach a peer that has both (default auto: IPv6; 4: IPv4, and the peers "
        "use IPv4 towards this host too); a peer with one family is reached over it, one sharing "
        "none with this host is unreachable and shown so in status",
    )
    p.add_argument(
        "--peer",
        metavar="IP",
        action="append",
        help="another host's VTEP address (IPv4 or IPv6, a family this host has); repeat for each peer",
    )
    p.add_argument("--tap", help="TAP device name (default ovl0)")
    p.add_argument("--address", metavar="IP/LEN", help="IPv4 address with prefix for the TAP, e.g. 198.19.0.1/24")
    p.add_argument(
        "--port", help="VXLAN UDP port, to listen on and send to (default 4789; Linux's old default is 8472)"
    )
    p.add_argument("--mtu", help="TAP MTU (default: the underlay interface's MTU minus 50 on IPv4, 70 on IPv6)")
    p.add_argument("--mac", help="TAP MAC address, e.g. 02:00:00:00:00:01 (default: random)")
    p.add_argument(
        "--no-source-check",
        dest="source_check",
        action="store_const",
        const=False,
        help="accept datagrams from any address, not only the peers",
    )
    p.add_argument(
        "--allow-vlan",
        dest="allow_vlan",
        action="store_const",
        const=True,
        help="carry VLAN-tagged inner frames (RFC 7348 section 6.1 says drop them by default)",
    )
    p.add_argument("--ageing", metavar="SECONDS", help="forget learned MACs unseen this long (default 300)")
    p.add_argument("--max-per-vni", dest="max_per_vni", metavar="N", help="cap on MACs per VNI (default 65536)")
    p.add_argument(
        "--bridge",
        dest="bridge",
        action="store_const",
        const=True,
        help="put each network's TAP in a Linux bridge ovbr<vni> that containers are attached to "
        "('overlay attach', which needs etcd mode); the host's --address and --mac go to the "
        "bridge (default in etcd mode)",
    )
    p.add_argument(
        "--no-bridge",
        dest="bridge",
        action="store_const",
        const=False,
        help="no bridge: the TAP itself holds --address (default in static mode)",
    )
    p.add_argument(
        "--state-dir",
        dest="state_dir",
        metavar="DIR",
        help="where attached containers are remembered, so a restarted agent takes them back (default /run/overlay)",
    )
    p.add_argument(
        "--resolv-conf",
        dest="resolv_conf",
        metavar="FILE",
        help="the host's resolvers, where the gateways' DNS sends names outside the overlay (default "
        "/etc/resolv.conf; loopback servers are skipped; none left: such names are REFUSED)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, or 'off' (default 127.0.0.1:9465; "
        "if the default is taken the agent runs without metrics and says so)",
    )
    p.add_argument(
        "--probe-port",
        dest="probe_port",
        metavar="PORT",
        help="UDP port for probing peers' underlay RTT and loss once a second, 0 = off (default 4799)",
    )
    k = p.add_argument_group(
        "encryption (each host has an X25519 key; sessions come from handshakes between host keys)"
    )
    k.add_argument(
        "--key-file",
        dest="key_file",
        metavar="PATH",
        help="this host's private key, created (mode 0600) on first start if missing (default "
        "<state-dir>/<host-id>.key, static mode <state-dir>/static.key; the default state dir /run is "
        "emptied at boot, so give a lasting path when peers list the key with --peer-key). Its public "
        "key: 'overlay key show'",
    )
    k.add_argument(
        "--encrypt",
        dest="encrypt",
        action="store_const",
        const=True,
        help="static mode: authenticate and encrypt all traffic of the VNI; every --peer needs a "
        "--peer-key. In etcd mode a network is encrypted in the registry instead "
        "('overlay net create VNI --encrypted', 'overlay net set VNI --encrypted')",
    )
    k.add_argument(
        "--peer-key",
        dest="peer_key",
        metavar="ADDRESS=PUBKEY",
        action="append",
        help="static mode, with --encrypt: a --peer's public key (what 'overlay key show' prints on that "
        "host, 44 base64 characters); repeat for each peer",
    )
    k.add_argument(
        "--rekey-after",
        dest="rekey_after",
        metavar="SECONDS",
        help="make new session keys this often while traffic flows (default 120, as WireGuard); a "
        "session's responder rekeys at 1.25x if the initiator did not, and a session is refused at 1.5x",
    )
    e = p.add_argument_group("etcd mode (peers, flood lists and endpoints from the registry)")
    e.add_argument(
        "--etcd",
        metavar="URL",
        action="append",
        help="etcd endpoint, e.g. http://198.18.0.250:2379; repeat for each member of a cluster",
    )
    e.add_argument("--host-id", dest="host_id", metavar="ID", help="this host's id in the registry, e.g. h1")
    e.add_argument(
        "--network",
        metavar="VNI",
        action="append",
        help="the network to join (created in etcd with defaults if it is not defined)",
    )
    e.add_argument("--prefix", help="etcd key prefix (default /overlay/v1)")
    e.add_argument(
        "--lease-ttl",
        dest="lease_ttl",
        metavar="SECONDS",
        help="TTL of the host's lease: how soon a dead host disappears (default 10)",
    )
    e.add_argument(
        "--etcd-ca",
        dest="etcd_ca",
        metavar="FILE",
        help="TLS: the CA that signed etcd's certificate (https:// endpoints)",
    )
    e.add_argument(
        "--etcd-cert", dest="etcd_cert", metavar="FILE", help="TLS: client certificate, when etcd asks for one"
    )
    e.add_argument("--etcd-key", dest="etcd_key", metavar="FILE", help="TLS: the client certificate's key")
    e.add_argument("--etcd-user", dest="etcd_user", metavar="NAME", help="etcd user (with --etcd-password)")
    e.add_argument(
        "--etcd-password",
        dest="etcd_password",
        metavar="PASSWORD",
        help="etcd password; better in the TOML file or OVERLAY_ETCD_PASSWORD than on the command line",
    )
    e.add_argument(
        "--docker-plugin",
        dest="docker_plugin",
        metavar="NAME",
        nargs="?",
        const="overlay",
        help="serve Docker's remote network and IPAM drivers as plugin NAME (default overlay): "
        "docker network create -d NAME --ipam-driver NAME --subnet S -o vni=N",
    )
    e.add_argument(
        "--docker-plugin-dir",
        dest="docker_plugin_dir",
        metavar="DIR",
        help="where the plugin's socket NAME.sock goes (default /run/docker/plugins, where Docker looks)",
    )
    p.set_defaults(func=cmd_agent)


# --- overlay status / fdb -------------------------------------------------------------------


def _ask(cmd: str, tap: str | None, timeout: float = 5.0, **params: Any) -> Any:
    from overlay.io import control

    try:
        return control.request(cmd, tap, timeout, **params)
    except control.ControlError as e:
        if e.kind in ("invalid", "address", "network", "netns", "unknown"):
            raise UserError(str(e)) from None
        raise RunError(str(e)) from None


def format_status(s: Status) -> str:
    """The human form of ``overlay status``; ``--json`` prints the agent's JSON instead."""
    a, d = s.agent, s.dataplane
    lines = [
        f"agent  vtep {format_address(a.local, a.port)}"
        f"{'  vtep6 ' + format_address(a.local6, a.port) if a.local6 else ''}  mtu {a.mtu}"
        f"{'  ' + a.address if a.address else ''}  "
        f"up {a.uptime_s} s  source check {'on' if a.source_check else 'off'}",
    ]
    if a.unreachable:
        lines.append(f"  UNREACHABLE (no shared underlay family): {', '.join(a.unreachable)}")
    for n in a.networks:
        lines.append(f"  vni {n.vni:<8} tap {n.tap:15} {'bridge ' + n.bridge if n.bridge else '':15} mac {n.mac}")
    r = s.registry
    if r:
        lines.append(
            f"registry  etcd {', '.join(r.endpoints)}  host {r.host_id}  "
            f"{'connected' if r.connected else 'DISCONNECTED (forwarding with what it knew)'}  "
            f"revision {r.revision}  reconnects {r.reconnects}  resyncs {r.resyncs}"
        )
        lag = r.apply_lag
        lines.append(
            f"  applied revision {r.applied_revision}  keys {r.keys}  events {r.events}  "
            f"apply lag p50 {lag.p50_ms:g} ms p99 {lag.p99_ms:g} ms max {lag.max_ms:g} ms  "
            f"last read {r.resync_keys} keys in {r.resync_s:g} s  refused {r.refused}"
            + (f"  OUT OF SCOPE {r.out_of_scope}" if r.out_of_scope else "")
        )
    defined = [n for n in a.networks if n.name is not None]  # what the registry defines (etcd mode)
    if defined:
        lines += ["", f"{'network':16} {'vni':>8}  {'gateway':34} {'nat':4} joined"]
        for n in defined:
            gateways = " ".join(g for g in (n.gateway, n.gateway6) if g) or "-"
            lines.append(
                f"{str(n.name)[:16]:16} {n.vni:>8}  {gateways:34} {'on' if n.nat else 'off':4} "
                f"{'at start (--network)' if n.pinned else 'on demand'}"
            )
    lines += [
        "",
        f"{'peer':24} {'rx frames':>12} {'rx bytes':>14} {'tx frames':>12} {'tx bytes':>14}",
    ]
    for p in d.peers:
        lines.append(f"{p.vtep:24} {p.rx_frames:>12} {p.rx_bytes:>14} {p.tx_frames:>12} {p.tx_bytes:>14}")
    t = d.totals
    lines.append(f"{'total':24} {t.rx_frames:>12} {t.rx_bytes:>14} {t.tx_frames:>12} {t.tx_bytes:>14}")
    lines += ["", "drops  " + ("  ".join(f"{k} {v}" for k, v in d.drops.items() if v) or "none")]
    f = d.fdb
    lines.append(
        f"fdb    static {f.static}  registry {f.registry}  learned {f.learned}  "
        f"(refused at cap {f.refused_cap}, moves {f.moves}, expired {f.expired})"
    )
    lines.append(
        f"arp    answered locally {d.arp_suppressed}   nd (IPv6) answered locally {d.nd_suppressed}   "
        f"tcp segments coalesced on receive {d.coalesced_frames}"
    )
    if s.probes:
        lines += ["", f"{'peer host':16} {'underlay path':22} {'rtt ms':>8} {'srtt ms':>8} {'loss':>6}  state"]
        for host, probe in sorted(s.probes.items()):
            rtt = "-" if probe.rtt_ms is None else f"{probe.rtt_ms:.3f}"
            srtt = "-" if probe.srtt_ms is None else f"{probe.srtt_ms:.3f}"
            lines.append(
                f"{host:16} {probe.address:22} {rtt:>8} {srtt:>8} {probe.loss:>6.0%}  "
                f"{'ok' if probe.reachable else 'UNREACHABLE'}"
            )
    e = s.encryption
    if e is not None:
        nets = ", ".join(map(str, e.networks)) or "none"
        hs = e.handshakes
        lines += [
            "",
            f"encryption  key {e.fingerprint}  encrypted networks {nets}  handshakes completed "
            f"{hs.get('completed', 0)} rejected {hs.get('rejected', 0)} rate-limited {hs.get('limited', 0)}",
        ]
        if e.without_key:
            lines.append(f"  NO KEY (nothing is sent to them on encrypted networks): {', '.join(e.without_key)}")
        if e.sessions:
            lines.append(
                f"  {'peer':24} {'key':9} {'state':12} {'age s':>7} {'rekeys':>7} {'sealed':>10} {'opened':>10}"
            )
        for session in e.sessions:
            age = "-" if session.age_s is None else f"{session.age_s:g}"
            lines.append(
                f"  {session.peer:24} {session.key:9} {session.state:12} {age:>7} {session.rekeys:>7} "
                f"{session.tx_messages:>10} {session.rx_messages:>10}"
            )
    if s.attachments:
        lines += ["", f"{'container':34} {'network':12} {'if':6} {'mac':17} {'address':18} {'host end':13}"]
        for c in s.attachments:
            lines.append(
                f"{str(c['id'])[:34]:34} {str(c['network'])[:12]:12} {c['ifname']!s:6} {c['mac']!s:17} "
                f"{(c['address'] or c.get('address6'))!s:18} {c['host_ifname']!s:13}"
            )
            published = c.get("published")
            exposed = c.get("exposed")
            extra = (
                ([f"name {c['name']}"] if c.get("name") else [])
                + ([f"exposes {', '.join(map(str, exposed))}"] if isinstance(exposed, list) and exposed else [])
                + (
                    [f"published {', '.join(_publication(p) for p in published)}"]
                    if isinstance(published, list) and published
                    else []
                )
            )
            if extra:
                lines.append("  " + "  ".join(extra))
    g = s.egress
    if g is not None:
        state = f"applied, {g.rules} rules" if g.applied else f"NOT APPLIED: {g.error or 'no reason given'}"
        lines += ["", f"egress  nft table {g.table}  {state}"]
        if g.error and g.applied:  # applied once, the last change failed
            lines.append(f"  last change failed: {g.error}")
        if g.forwarding:
            lines.append(f"  ip forwarding turned on: {', '.join(g.forwarding)}")
        lines += [f"  PROBLEM: {problem}" for problem in g.problems]
    dns = s.dns
    if dns is not None:
        counters = "  ".join(f"{k} {v}" for k, v in dns.counters.items())
        lines += [
            "",
            f"dns     listening {', '.join(dns.listening) or 'nowhere'}  upstreams {', '.join(dns.upstreams) or 'none'}",
        ]
        if counters:
            lines.append(f"  {counters}")
    return "\n".join(lines)


def _publication(p: Any, to: str | None = None) -> str:
    """A publication (JSON) as people read it: ``0.0.0.0:8080 -> 80/tcp``, or with the
    container's address ``to``: ``0.0.0.0:8080 -> 198.19.42.2:80/tcp``."""
    if not isinstance(p, dict):
        return str(p)
    host = format_address(p.get("host_ip") or "0.0.0.0", p.get("host_port") or 0)
    port = p.get("port", 0)
    target = format_address(to.split("/")[0], port) if to else str(port)
    return f"{host} -> {target}/{p.get('proto', 'tcp')}"


def cmd_status(args: argparse.Namespace) -> int:
    answer = _ask("status", args.tap)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    try:
        status = Status.from_json(answer)
    except ValueError as e:
        raise RunError(f"the agent's status is not understood ({e}): is it another version of overlay?") from None
    print(format_status(status))
    return 0


def cmd_fdb(args: argparse.Namespace) -> int:
    entries = _ask("fdb", args.tap)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"{'vni':>8}  {'mac':17}  {'vtep':21}  {'source':8}  {'age s':>7}")
    for e in entries:
        age = "" if e["age_s"] is None else f"{e['age_s']:.1f}"
        print(f"{e['vni']:>8}  {e['mac']:17}  {e['vtep']:21}  {e['source']:8}  {age:>7}")
    return 0


def add_status(sub: Any) -> None:
    for name, func, text in (
        (
            "status",
            cmd_status,
            "a running agent's counters: per-peer traffic, drops by reason, forwarding-table size; its "
            "networks (gateways, NAT), containers (names, exposed and published ports), egress rules and DNS",
        ),
        ("fdb", cmd_fdb, "a running agent's forwarding table"),
    ):
        p = sub.add_parser(name, help=text, description=f"Show {text}. Asks the agent of this network namespace.")
        p.add_argument("--tap", help="which agent, when several run in this namespace")
        p.add_argument("--json", action="store_true", help="machine-readable output (shape in README.md)")
        p.set_defaults(func=func)


# --- overlay attach / detach ----------------------------------------------------------------


def netns_path(target: str) -> str:
    """The network namespace file of a target: a PID, a path, or a name from 'ip netns'."""
    if target.isdigit():
        return f"/proc/{target}/ns/net"
    if "/" in target:
        return target
    return f"/run/netns/{target}"


def parse_container_name(text: str) -> str:
    """``--name``: a DNS label (the container resolves as NAME and NAME.NETWORK)."""
    from overlay.core.registry import DNS_LABEL, DNS_LABEL_FORM

    if not DNS_LABEL.match(text):
        raise UserError(f"--name {text!r} is not a DNS label: {DNS_LABEL_FORM}, e.g. web")
    return text


def parse_publish(text: str, flag: str = "") -> str:
    """A publication spec (overlay.core.ports), checked here and sent in its canonical form."""
    from overlay.core import ports

    try:
        return str(ports.parse(text))
    except ValueError as e:  # "publish '8080:0': port 0 is not a port (1 to 65535)"
        raise UserError(f"{flag}{str(e).removeprefix('publish ')}" if flag else str(e)) from None


def parse_expose(text: str) -> str:
    """``--expose``: a port the container serves (overlay.core.ports), sent as "PORT/proto"."""
    from overlay.core import ports

    try:
        return ports.parse_exposed(text)
    except ValueError as e:  # "expose '80/sctp': protocol 'sctp' is not tcp or udp (PORT[/tcp|udp], ...)"
        raise UserError(f"--{e}") from None


def parse_unpublish(text: str) -> str:
    """What ``overlay unpublish`` takes: ``all``, ``HOSTPORT[/tcp|udp]`` or a whole spec."""
    from overlay.core import ports

    t = text.strip()
    if t.lower() == "all":
        return "all"
    port, _, proto = t.partition("/")
    if port.isdigit() and ":" not in t:
        proto = (proto or "tcp").lower()
        if not 1 <= int(port) <= 65535 or proto not in ports.PROTOCOLS:
            raise UserError(f"unpublish {text!r}: a host port is 1 to 65535, a protocol tcp or udp, e.g. 8080/udp")
        return f"{int(port)}/{proto}"
    try:
        return str(ports.parse(t))
    except ValueError as e:
        raise UserError(f"un{e}; or give HOSTPORT[/tcp|udp] (e.g. 8080), or all") from None


def publish_target(text: str) -> str:
    """The target of publish/unpublish as the agent takes it: a namespace (name from 'ip netns',
    path or PID) as its absolute path, as attach sends it; anything else as given (an
    attachment id or a container's --name, which the agent looks up)."""
    path = netns_path(text)
    return os.path.abspath(path) if os.path.exists(path) else text


def _who(answer: Any) -> str:
    name, ident = answer.get("name"), answer.get("id")
    return f"{name}, {ident}" if name else str(ident)


def cmd_publish(args: argparse.Namespace) -> int:
    if args.all and args.spec is not None:
        raise UserError(f"give a SPEC ({args.spec}) or --all (every port the container exposes), not both")
    if not args.all and args.spec is None:
        raise UserError(
            "say what to publish: a SPEC (e.g. 8080:80, or 80 for a random host port), "
            "or --all for every port the container exposes"
        )
    target = publish_target(args.target)
    if args.all:
        try:
            answer = _ask("publish", args.tap, 30.0, target=target, all=True)
        except UserError as e:
            if str(e) == "missing spec":  # an agent from before --all read the request as one without a spec
                raise UserError(
                    "the agent does not know 'publish --all' (it predates exposed ports): upgrade it, "
                    "or publish each port with 'overlay publish TARGET PORT'"
                ) from None
            raise
    else:
        answer = _ask("publish", args.tap, 30.0, target=target, spec=parse_publish(args.spec))
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    published = answer["published"]
    entries = published if isinstance(published, list) else [published]  # --all: a list, one per port
    if not entries:
        print(f"nothing was published for {_who(answer)}: it exposes no port that is not published yet")
    for p in entries:
        print(f"published {_publication(p, answer.get('address'))} ({_who(answer)})")
    return 0


def cmd_unpublish(args: argparse.Namespace) -> int:
    spec = parse_unpublish(args.spec)
    answer = _ask("unpublish", args.tap, 30.0, target=publish_target(args.target), spec=spec)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not answer["unpublished"]:
        print(f"nothing was published for {answer['id']}")
    for p in [] if args.json else answer["unpublished"]:
        print(f"unpublished {_publication(p)} ({answer['id']})")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    path = netns_path(args.target)
    name = parse_container_name(args.name) if args.name is not None else None
    publish = [parse_publish(text, "--publish ") for text in args.publish or []]
    expose = list(dict.fromkeys(parse_expose(text) for text in args.expose or []))
    if not os.path.exists(path):
        what = "process" if args.target.isdigit() else "network namespace"
        raise UserError(
            f"no {what} {args.target} ({path} does not exist): give a name from 'ip netns', "
            f"a namespace path, or a container's PID"
        )
    a = _ask(
        "attach",
        args.tap,
        60.0,
        netns=os.path.abspath(path),
        net=args.net,
        ifname=args.ifname,
        ip=args.ip,
        mac=args.mac,
        gateway=args.gateway,
        **({"ip6": args.ip6} if args.ip6 is not None else {}),
        **({"gateway6": args.gateway6} if args.gateway6 is not None else {}),
        **({"name": name} if name is not None else {}),
        **({"publish": publish} if publish else {}),
        **({"expose": expose} if expose else {}),
    )
    if expose and "exposed" not in a:
        print(
            "overlay: warning: the agent recorded no exposed port (it predates --expose): upgrade it, "
            "then attach the container again to record them",
            file=sys.stderr,
        )
    if publish and "published" not in a:
        print(
            "overlay: warning: the agent published no port (it predates --publish): upgrade it, "
            "then 'overlay publish' the ports",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(a, indent=2))
    else:
        print(
            f"attached {args.target}{' as ' + a['name'] if a.get('name') else ''}: "
            f"{a['ifname']} {a['mac']} {a['address'] or ''}"
            f"{' ' + a['address6'] if a.get('address6') else ''} on network {a['network']} "
            f"(VNI {a['vni']}), mtu {a['mtu']}{', gateway ' + a['gateway'] if a['gateway'] else ''}; "
            f"host end {a['host_ifname']}"
        )
        if a.get("exposed"):
            print(f"  exposes {', '.join(map(str, a['exposed']))}")
        for p in a.get("published") or []:
            v6 = ":" in str(p.get("host_ip") or "") and a.get("address6")  # an IPv6 host address: to the IPv6 one
            print(f"  published {_publication(p, a.get('address6') if v6 else a['address'] or a.get('address6'))}")
        dns = a.get("dns")
        if isinstance(dns, dict) and dns.get("nameservers"):
            print(f"  dns {', '.join(dns['nameservers'])}, search {', '.join(dns.get('search') or []) or '-'}")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    if args.target is None and args.id is None:
        raise UserError("say what to detach: a namespace (name, path or PID) or --id ID (see 'overlay status')")
    params: dict[str, Any] = {"ifname": args.ifname}
    if args.id is not None:
        params["id"] = args.id
    else:
        params["netns"] = os.path.abspath(netns_path(args.target))
    answer = _ask("detach", args.tap, 60.0, **params)
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not answer["detached"]:
        print(f"nothing attached for {args.target or args.id}")
    for a in [] if args.json else answer["detached"]:
        print(f"detached {a['ifname']} {a['mac']} {a['address'] or ''} from network {a['network']} (VNI {a['vni']})")
    return 0


def add_attach(sub: Any) -> None:
    p = sub.add_parser(
        "attach",
        help="put a container (network namespace) on an overlay network",
        description=(
            "Connect a container to an overlay network, like pipework: a veth pair, one end in the "
            "container with its MAC, address, MTU and default route, the other in the network's bridge "
            "on this host. The endpoint (MAC, address, this host) is registered in etcd under the agent's "
            "lease, so every host forwards to it. Without --ip an address is allocated from the network's "
            "subnet. --name gives it a DNS name on the network, --publish forwards ports of this host to it "
            "(also later: 'overlay publish'), --expose records the ports it serves in its endpoint (for "
            "'overlay endpoint ls', and 'overlay publish TARGET --all' publishes them). Asks the agent of "
            "this network namespace (etcd mode)."
        ),
        epilog=(
            "examples:\n"
            "  overlay attach web1 --net blue                      # a namespace from 'ip netns'\n"
            "  overlay attach 4242 --net 42 --ip 198.19.42.10/24   # a process's namespace\n"
            "  overlay attach /var/run/netns/db --net red --gateway 198.19.43.1\n"
            "  overlay attach web2 --net blue --ip6 2001:2:0:42::10/64   # dual-stack: the network has subnet6\n"
            "  overlay attach web1 --net blue --name web --publish 8080:80   # web and web.blue resolve to it;\n"
            "                                                      # the host's port 8080 goes to its port 80\n"
            "  overlay attach db --net blue --publish 5432 --publish 198.18.0.1:5353:53/udp   # 5432: a random host port\n"
            "  overlay attach web1 --net blue --name web --expose 80 --expose 53/udp   # prints: exposes 80/tcp, 53/udp\n"
            "  overlay publish web --all                           # later: each exposed port on a random host port"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="NETNS", help="namespace name (ip netns), path of a namespace file, or a PID")
    p.add_argument("--net", required=True, help="the network's name or VNI")
    p.add_argument("--ip", metavar="A.B.C.D/LEN", help="the container's address (default: the lowest free one)")
    p.add_argument("--mac", help="the container's MAC (default: a random 02:xx:xx:xx:xx:xx)")
    p.add_argument("--ifname", default="eth0", help="the interface's name in the container (default eth0)")
    p.add_argument("--gateway", metavar="A.B.C.D", help="default route (default: the network's gateway, if set)")
    p.add_argument(
        "--ip6",
        metavar="V6/LEN",
        help="the container's IPv6 address (default: the lowest free one of the network's subnet6, "
        "when it has one; 'none' for no IPv6 address)",
    )
    p.add_argument("--gateway6", metavar="V6", help="IPv6 default route (default: the network's gateway6, if set)")
    p.add_argument(
        "--name",
        help="the container's name, a DNS label (letters, digits, '-'): NAME and NAME.NETWORK resolve to its "
        "address through the DNS on the network's gateway, on every host",
    )
    p.add_argument(
        "--publish",
        metavar="SPEC",
        action="append",
        help="publish a port of this host onto the container's: [HOSTIP:]HOSTPORT:PORT[/tcp|udp], or "
        "PORT[/tcp|udp] for a random free host port (printed); repeat for each port",
    )
    p.add_argument(
        "--expose",
        metavar="PORT[/tcp|udp]",
        action="append",
        help="a port the container serves (tcp by default), recorded in its endpoint in the registry "
        "(not published: 'overlay publish TARGET --all' does that); repeat for each port",
    )
    p.add_argument("--tap", help="which agent, when several run in this namespace")
    p.add_argument("--json", action="store_true", help='print the attachment as JSON (with "exposed": ["80/tcp"])')
    p.set_defaults(func=cmd_attach)
    p = sub.add_parser(
        "detach",
        help="take a container off the overlay (undo attach)",
        description=(
            "Undo 'overlay attach': remove the veth pair, delete the endpoint and release the "
            "address. Detaching what is not attached is not an error."
        ),
    )
    p.add_argument("target", metavar="NETNS", nargs="?", help="namespace name, path or PID, as given to attach")
    p.add_argument("--ifname", help="only this interface (default: all the container's attachments)")
    p.add_argument("--id", help="an attachment id from 'overlay status' (e.g. when the namespace is gone)")
    p.add_argument("--tap", help="which agent, when several run in this namespace")
    p.add_argument("--json", action="store_true", help="print what was detached as JSON")
    p.set_defaults(func=cmd_detach)
    target_help = (
        "the container: an attachment id (from 'overlay status'), its --name, or its namespace "
        "(name from 'ip netns', path or PID; a namespace of that name wins over a --name)"
    )
    p = sub.add_parser(
        "publish",
        help="publish a port of this host onto an attached container's port",
        description=(
            "Forward a port of this host (TCP or UDP, on every address of the host or one) to a port of a "
            "container attached here, by destination NAT in the agent's nftables table (inet overlay); "
            "the container's replies go back the same way. Without a host port a random free one is "
            "chosen and printed. --all publishes every port the container exposes (attach --expose, CNI "
            "portMappings) and has not published yet, each on a random free host port. The publication "
            "lasts as long as the attachment (also across agent restarts), or until 'overlay unpublish'. "
            "Asks the agent of this network namespace."
        ),
        epilog=(
            "examples:\n"
            "  overlay publish web 8080:80                  # this host's port 8080 -> the container's 80/tcp\n"
            "  overlay publish web 80                       # a random free host port -> 80/tcp (printed)\n"
            "  overlay publish web 198.18.0.1:5353:53/udp   # only on that address of the host\n"
            "  overlay publish cni/c0ffee/eth0 [2001:2:0:1::1]:8443:443\n"
            "  overlay publish web --all                    # every exposed port, each on a random host port\n"
            "prints: published 0.0.0.0:8080 -> 198.19.42.2:80/tcp (web, cni/c0ffee/eth0)\n"
            "        (--all: one such line per port published)\n"
            "SPEC: [HOSTIP:]HOSTPORT:PORT[/tcp|udp], or [HOSTIP::]PORT[/tcp|udp]; ports 1-65535, tcp by default"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET", help=target_help)
    p.add_argument(
        "spec", metavar="SPEC", nargs="?", help="[HOSTIP:]HOSTPORT:PORT[/tcp|udp], or PORT[/tcp|udp] (or --all)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="instead of SPEC: every exposed port not published yet, each on a random free host port",
    )
    p.add_argument("--tap", help="which agent, when several run in this namespace")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"id", "name", "address", "published"}; with --all "published" is a list, one per port',
    )
    p.set_defaults(func=cmd_publish)
    p = sub.add_parser(
        "unpublish",
        help="stop publishing a port onto a container (undo publish)",
        description=(
            "Remove publications of a container attached here: the one on a host port (HOSTPORT, tcp unless "
            "/udp is given, or the whole spec as published), or all of them. Asks the agent of this "
            "network namespace."
        ),
        epilog=(
            "examples:\n"
            "  overlay unpublish web 8080          # host port 8080/tcp\n"
            "  overlay unpublish web 5353/udp\n"
            "  overlay unpublish web 8080:80       # the spec as it was published\n"
            "  overlay unpublish web all"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET", help=target_help)
    p.add_argument("spec", metavar="SPEC", help="HOSTPORT[/tcp|udp], a whole spec, or all")
    p.add_argument("--tap", help="which agent, when several run in this namespace")
    p.add_argument("--json", action="store_true", help='print {"id", "unpublished": [...]}')
    p.set_defaults(func=cmd_unpublish)


# --- overlay key ------------------------------------------------------------------------------


def key_file_of(args: argparse.Namespace) -> Path:
    """The key file the flags name: --key-file, else <state-dir>/<host-id>.key (static.key without
    a host id); --config supplies what the flags leave out, as the agent reads it."""
    from overlay.core import config
    from overlay.core.keys import key_file_name
    from overlay.core.registry import HOST_ID, HOST_ID_FORM

    settings: dict[str, Any] = {}
    if args.config:
        try:
            text = Path(args.config).read_text()
        except OSError as e:
            raise UserError(f"--config {args.config}: {e.strerror}") from None
        settings = config.parse_toml(text, args.config)
    if args.key_file is not None:
        return Path(os.path.abspath(args.key_file))
    if args.host_id is None and settings.get("key_file") is not None:
        if not isinstance(settings["key_file"], str) or not settings["key_file"].startswith("/"):
            raise UserError(f"{args.config}: key_file {settings['key_file']!r} is not an absolute file path")
        return Path(settings["key_file"])
    host_id = args.host_id if args.host_id is not None else settings.get("host_id") if settings.get("etcd") else None
    if host_id is not None and (not isinstance(host_id, str) or not HOST_ID.match(host_id)):
        raise UserError(f"--host-id {host_id!r} is not a host id: {HOST_ID_FORM}, e.g. h1")
    state_dir = args.state_dir if args.state_dir is not None else settings.get("state_dir", config.DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        raise UserError(f"--state-dir {state_dir!r} is not a directory path like /run/overlay")
    return Path(os.path.abspath(state_dir)) / key_file_name(host_id)


def _key_error(e: KeyFileError) -> Exception:
    """A key file to fix (its mode, type or content) is exit 2; anything else exit 1."""
    return UserError(str(e)) if e.kind in ("unsafe", "invalid") else RunError(str(e))


def _print_key(args: argparse.Namespace, path: Path, private: bytes) -> None:
    from overlay.core.keys import encode, fingerprint, public_of

    public = public_of(private)
    if args.json:
        print(json.dumps({"key_file": str(path), "pubkey": encode(public), "fingerprint": fingerprint(public)}))
    else:
        print(encode(public))


def cmd_key_show(args: argparse.Namespace) -> int:
    from overlay.io import keys

    path = key_file_of(args)
    try:
        private = keys.load(path)
    except keys.KeyFileError as e:
        if e.kind == "missing":
            raise RunError(
                f"{path} does not exist: the agent creates it on first start, "
                f"or run 'overlay key generate --key-file {path}'"
            ) from None
        raise _key_error(e) from None
    _print_key(args, path, private)
    return 0


def cmd_key_generate(args: argparse.Namespace) -> int:
    from overlay.io import keys

    path = key_file_of(args)
    private = keys.generate_private()
    try:
        keys.write(path, private, replace=args.force)
    except keys.KeyFileError as e:
        if e.kind == "exists":
            raise RunError(
                f"{path} exists: 'overlay key show' prints its public key; give --force to replace it "
                f"with a new key (see 'overlay key generate --help' on rotating a key)"
            ) from None
        raise _key_error(e) from None
    _print_key(args, path, private)
    if not args.json:
        print(
            f"overlay: wrote a new private key to {path} (mode 0600); a running agent uses it once restarted",
            file=sys.stderr,
        )
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    answer = _ask("rotate_key", args.tap, timeout=15.0)
    if args.json:
        print(json.dumps(answer))
    else:
        print(answer["pubkey"])
        print(f"overlay: the agent now uses a new key ({answer['fingerprint']}, {answer['key_file']})", file=sys.stderr)
    return 0


KEY_FILE_NOTE = (
    "The key file: --key-file PATH, else <state-dir>/<host-id>.key (etcd mode), "
    "<state-dir>/static.key (static mode), as the agent finds it; --config FILE reads "
    "key_file, state_dir and host_id from the agent's TOML file."
)


def add_key(sub: Any) -> None:
    p = sub.add_parser(
        "key",
        help="this host's key for encrypted networks: show its public key, or generate a new one",
        description=(
            "Each agent has an X25519 private key in a file of its own (mode 0600), created on first "
            "start. Its public key is published in the registry (etcd mode: the host's pubkey, shown "
            "by 'overlay host ls') or given to each peer with --peer-key ADDRESS=PUBKEY (static mode)."
        ),
        epilog="examples:\n  overlay key show\n  overlay key show --host-id h1 --state-dir /var/lib/overlay\n"
        "  overlay key generate --key-file /var/lib/overlay/static.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def show_help(_: argparse.Namespace) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=show_help)
    actions = p.add_subparsers(title="actions", metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", metavar="FILE", help="the agent's TOML file: its key_file, state_dir, host_id")
        q.add_argument(
            "--state-dir", dest="state_dir", metavar="DIR", help="the agent's --state-dir (default /run/overlay)"
        )
        which = q.add_mutually_exclusive_group()
        which.add_argument("--host-id", dest="host_id", metavar="ID", help="the agent's --host-id (etcd mode)")
        which.add_argument("--key-file", dest="key_file", metavar="PATH", help="the key file itself")
        q.add_argument("--json", action="store_true", help='print {"key_file", "pubkey", "fingerprint"}')

    q = actions.add_parser(
        "show",
        help="print the public key of this host's key file",
        description="Print the public key (44 characters of base64) of a key file; creates nothing. " + KEY_FILE_NOTE,
        epilog="examples:\n"
        "  overlay key show                                   # static mode, /run/overlay/static.key\n"
        "  overlay key show --host-id h1                      # etcd mode, /run/overlay/h1.key\n"
        "  overlay key show --config /etc/overlay/agent.toml  # whichever file that agent uses\n"
        "static mode: what it prints on 198.18.0.1 is PUBKEY in the peers' --peer-key 198.18.0.1=PUBKEY",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(q)
    q.set_defaults(func=cmd_key_show)
    q = actions.add_parser(
        "generate",
        help="create a new private key file and print its public key",
        description="Create a new private key file (mode 0600, its directory 0700 if new) and print its "
        "public key. An existing key file is never overwritten without --force. " + KEY_FILE_NOTE,
        epilog="examples:\n"
        "  overlay key generate --key-file /var/lib/overlay/static.key\n"
        "  overlay key generate --host-id h1 --force          # rotate h1's key\n"
        "\n"
        "A running agent keeps the key it started with: to change the key of a running host without\n"
        "losing traffic use 'overlay key rotate'. A key generated with --force over the file is used\n"
        "from the agent's next start (its restart interrupts traffic for a moment).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(q)
    q.add_argument("--force", action="store_true", help="replace an existing key file (rotate the key)")
    q.set_defaults(func=cmd_key_generate)
    q = actions.add_parser(
        "rotate",
        help="give the running agent a new key, without losing traffic",
        description="Change the key of a running host without losing traffic. The running agent (of this\n"
        "network namespace) makes a new key, writes it to its key file (replacing the old one), publishes\n"
        "the new pubkey in hosts/<host-id> and handshakes with it from then on. Nothing is lost meanwhile:\n"
        "its sessions carry on; peers that see the new key handshake with it at once and keep the old\n"
        "sessions until the new one works; handshakes made to the old key are answered for 180 s more.\n"
        "Prints the new public key.",
        epilog="examples:\n  overlay key rotate\n  ip netns exec h1 overlay key rotate --json\n\n"
        "static mode: the peers know the key from their --peer-key: give them the new one (and restart\n"
        "them) within 180 s, or traffic with them stops when the old sessions expire.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--tap", help="the agent's first TAP, when several agents run here")
    q.add_argument("--json", action="store_true", help='print {"key_file", "pubkey", "fingerprint"}')
    q.set_defaults(func=cmd_key_rotate)


# --- overlay lab ------------------------------------------------------------------------------


def cmd_lab(args: argparse.Namespace) -> int:
    from overlay.lab import Lab, LabError

    try:
        lab = Lab(args.name, args.hosts, ipv6=args.ipv6)
        if args.action == "up":
            lab.up()
            for h in range(1, args.hosts + 1):
                where = " ".join(str(i) for i in lab.interfaces(h))
                print(f"{lab.ns(h)}  eth0 {where}    run: ip netns exec {lab.ns(h)} <command>")
            print(f"{lab.switch}  bridge br0    remove with: overlay lab down --name {args.name}")
        else:
            lab.down()
            print(f"lab {args.name} removed")
    except LabError as e:
        raise RunError(str(e)) from None
    return 0


def add_lab(sub: Any) -> None:
    p = sub.add_parser(
        "lab",
        help="make or remove a lab of hosts (network namespaces on a bridge)",
        description=(
            "A lab of hosts on this machine: network namespaces <name>-h1..hN, each with eth0 "
            "on 198.18.0.N/24 (2001:2:0:1::N/64 with --ipv6), joined by bridge br0 in namespace <name>-sw. 'down' kills "
            "everything still running in them and deletes them."
        ),
    )
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    p.add_argument("--name", default="ovl", help="lab name, the namespaces' prefix (default ovl)")
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="an IPv6-only underlay: eth0 on 2001:2:0:1::N/64 instead of 198.18.0.N/24",
    )
    p.set_defaults(func=cmd_lab)


# --- overlay demo -----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from overlay.lab import demo

    return demo.main(hosts=args.hosts, ipv6=args.ipv6)


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="bring up a lab with agents and containers on two networks, ping across it, tear it down",
        description="A local multi-host demo: a lab of hosts and a real etcd, an agent on "
        "each on networks blue and red, two containers per host attached with "
        "'overlay attach', pings between every pair of containers (same network "
        "talks, cross network does not), the registry and status, then cleanup.",
    )
    p.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="the whole demo on an IPv6-only underlay (2001:2:0:1::/64), containers dual-stack",
    )
    p.set_defaults(func=cmd_demo)


# --- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay",
        description=(
            "A userspace VXLAN overlay network for containers (RFC 7348), wire-compatible "
            "with the Linux kernel's vxlan device."
        ),
        epilog=(
            "try it:     overlay demo                      (as root: 3 hosts in namespaces, etcd, pings)\n"
            "one host:   overlay agent --etcd http://198.18.0.250:2379 --host-id h1 --local 198.18.0.1 "
            "--network 42 --address 198.19.42.1/24\n"
            "look:       overlay status; overlay fdb; overlay host ls --etcd URL\n"
            "each command has --help"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and whether the fast path is built")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (add_agent, add_status, add_attach, add_key, add_lab, add_demo):
        add(sub)
    from overlay.cmd import admin  # net, host, endpoint: operator commands against etcd (aetcd loaded lazily)

    admin.add_commands(sub)
    return parser


def version_line() -> str:
    """'overlay 0.1.0 (fast path: ok)' — and raises FastPathMissing if the extension is absent."""
    load()
    return f"overlay {__version__} (fast path: ok)"


def main(argv: Sequence[str] | None = None) -> int:
    from overlay.core.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s overlay %(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    try:
        if args.version:
            print(version_line())
            return 0
        if func is None:
            parser.print_help()
            return 0
        return func(args)
    except FastPathMissing as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 1
    except RunError as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 1
    except (UserError, ConfigError) as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
