"""Containers reach out and are reached: overlay's gateway, egress NAT and published ports side by
side with the kernel doing the same alone (a Docker-style bridge network), in one run.

    python -m bench.egress [--seconds 5] [--rounds 3] [--quick] [--out DIR] [--bridge-nf-call-iptables 0|1]

Cases (iperf3 TCP, 1 stream; the client sends):
- ``egress``: a container is the client, the outside (a namespace on the underlay standing for
  the internet) runs the server: out through the host's gateway and egress NAT (masquerade);
- ``publish``: the outside is the client of HOST_UNDERLAY_IP:8080, DNAT to the container's
  iperf3 server on port 5201;
- ``c2c`` (reference, overlay only): container to container across two hosts, no NAT.

Dataplanes, all set up once and measured in turn, case by case, in every round (their order
reversed every other round):
- ``kernel``: host 3 of the lab alone, as Docker's bridge network does it minus docker-proxy:
  a bridge dk0 (198.19.99.1/24), a veth to a container namespace (198.19.99.2/24, default via
  198.19.99.1, MTU 1500), ip_forward=1 and an nftables table of ours (``ip egressbench``):
  masquerade of 198.19.99.0/24 leaving by anything but dk0, a DNAT of local port 8080 to
  198.19.99.2:5201 in prerouting, and Docker's forward rules (policy drop; established back in,
  anything out of dk0, the published port in);
- ``kernel-mtu``: the same namespaces with the veth pair set to the overlay container's MTU
  (1418 here: 1500 less VXLAN's 50 and 32 kept for sealing) before each of its runs, so that
  overlay/kernel-mtu is the cost of the plumbing and rules alone;
- ``overlay``: agents in etcd mode on hosts 1 and 2 (a real etcd on the underlay), network 42
  "blue" 198.19.42.0/24 with gateway 198.19.42.1 (NAT on by default), a container on host 2
  attached with ``overlay attach --net blue --json`` (default route: the gateway) and
  ``overlay publish <ns> 8080:5201``, a container on host 1 for the reference.

The outside is the lab service "outside" at 198.18.0.201 (service hosts are .201 to .254; etcd
is .250). It has no route to 198.19.0.0/16: it sees the hosts' underlay addresses only. Every
iperf3 server is a one-off (``-s -1 -J``), so each measurement also checks what it went
through: for egress the server must see the host's underlay address as its peer (masquerade),
for publish the client must be connected to the host's underlay address, port 8080, and the
server must be the container's address, port 5201 (DNAT); the peer the container saw is
reported. Before the rounds each case is checked the same way with a 1-second run; a case that
fails is reported with the reason (commands and output), not measured, and the exit status is 1.

The host namespaces keep the lab's own net.bridge.bridge-nf-call-iptables (1 here: this kernel
has br_netfilter built in, as a Docker host has it loaded) unless ``--bridge-nf-call-iptables``
sets it in all of them (both rows alike).

Medians over rounds with every round's value, overlay/kernel and overlay/kernel-mtu per case
(ratio of the medians and the per-round ratios); the agents' CPU seconds during each overlay run (both agents: the egress
and publish paths should not touch them). Writes egress.md, egress.json and command.txt under
DIR (default bench/results/<date>-egress/). Traffic stays inside the lab's namespaces on
198.18.0.0/15; every load is bounded in time (iperf3 -t); everything made is removed at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bench.harness import cpu_seconds, on_sigterm
from overlay.lab import Lab, LabError, wait_for
from overlay.lab import etcd as etcdlab

HOST_PORT, PORT = 8080, 5201  # the published port on the host, the container's iperf3 server
OUTSIDE, OUTSIDE_HOST = "outside", 201  # lab service "outside" at 198.18.0.201
KERNEL_HOST = 3
KERNEL_BRIDGE, KERNEL_VETH = "dk0", "dkv0"
KERNEL_GATEWAY = ipaddress.IPv4Interface("198.19.99.1/24")
KERNEL_CONTAINER = ipaddress.IPv4Interface("198.19.99.2/24")
NFT_TABLE = "egressbench"  # family ip, in the kernel row's host namespace only
OVERLAY_HOSTS = (1, 2)  # the measured container is on host 2, the reference's client on host 1
VNI, NET_NAME = 42, "blue"
SUBNET, GATEWAY = "198.19.42.0/24", "198.19.42.1"
OVERLAY = [sys.executable, "-m", "overlay"]
PLANES = ("kernel", "kernel-mtu", "overlay")
LABELS = {
    "kernel": "kernel, Docker-style (MTU 1500)",
    "kernel-mtu": "kernel at overlay's MTU",
    "overlay": "overlay",
}
RATIOS = (("overlay", "kernel"), ("overlay", "kernel-mtu"))
CASES = {  # name -> label, the dataplanes it runs on
    "egress": ("container -> outside (egress NAT, masquerade)", PLANES),
    "publish": (f"outside -> published port {HOST_PORT} (DNAT to the container's {PORT})", PLANES),
    "c2c": ("reference: container -> container across hosts (overlay VXLAN, no NAT)", ("overlay",)),
}
IPERF_TRIES = 3  # a run that ends without its summary (a lost control connection) is run again
DEFAULT_OUT = Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-egress"


class CaseError(LabError):
    """A case could not be set up or measured, or did not go the way it must; says why."""


def nft_ruleset(
    gateway: ipaddress.IPv4Interface = KERNEL_GATEWAY, container: ipaddress.IPv4Interface = KERNEL_CONTAINER
) -> str:
    """The kernel row's nftables table: Docker's bridge network rules (iptables-nft), in a table
    of our own. DNAT of local port HOST_PORT to the container in prerouting (``-m addrtype
    --dst-type LOCAL``, not from the bridge), masquerade of the subnet leaving by anything but
    the bridge, and the filter FORWARD chain Docker installs (policy drop)."""
    subnet, c, br = gateway.network, container.ip, KERNEL_BRIDGE
    return f"""table ip {NFT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname != "{br}" fib daddr type local tcp dport {HOST_PORT} dnat to {c}:{PORT}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != "{br}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    oifname "{br}" ct state established,related accept
    iifname "{br}" oifname != "{br}" accept
    iifname "{br}" oifname "{br}" accept
    iifname != "{br}" oifname "{br}" ip daddr {c} tcp dport {PORT} accept
  }}
}}
"""


@dataclass
class Case:
    """One measurable path: an iperf3 client in ``client`` to ``target``:``port``, a one-off
    server in ``server`` bound to ``bind``. ``check`` looks at both JSON outputs and returns
    what was verified (raises CaseError if the path is not the one it should be)."""

    client: str
    server: str
    bind: str
    target: str
    port: int
    check: Callable[[dict[str, Any], dict[str, Any]], dict[str, str]]
    before: Callable[[], None] | None = None  # run before each run of it (the kernel rows: the MTU)


@dataclass
class Plane:
    """A dataplane as set up: its cases (those that work), why the others do not, facts for the
    report, the processes whose CPU is counted, and how to take it down again."""

    name: str
    cases: dict[str, Case] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    diagnose: Callable[[], str] | None = None  # what to add to a case's failure

    def teardown(self) -> None:
        while self.undo:
            try:
                self.undo.pop()()
            except Exception as e:  # keep undoing the rest
                print(f"... {self.name}: teardown step failed: {e}", flush=True)


def bare(address: str) -> str:
    """An address as iperf3 prints it, without an IPv4-mapped prefix or a prefix length."""
    return address.split("/")[0].removeprefix("::ffff:")


def connected(result: dict[str, Any]) -> dict[str, Any]:
    conns = result.get("start", {}).get("connected") or []
    if not conns:
        raise CaseError(f"iperf3 reported no connection: {result.get('error', 'no start.connected')}")
    return dict(conns[0])


def egress_check(host_address: str, container: str) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, str]]:
    """Egress: the client is the container, the outside must see the host's underlay address."""

    def check(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
        local, peer = bare(connected(client)["local_host"]), bare(connected(server)["remote_host"])
        if local != container:
            raise CaseError(f"egress: the client sent from {local}, not the container's {container}")
        if peer != host_address:
            raise CaseError(f"egress: the outside saw {peer} as its peer, not the host's {host_address}: no masquerade")
        return {"client_local": local, "outside_saw": peer}

    return check


def publish_check(host_address: str, container: str) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, str]]:
    """Publish: the outside connects to the host's underlay address and HOST_PORT, and the
    connection ends at the container's address and PORT (DNAT); the peer it sees is reported."""

    def check(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
        c, s = connected(client), connected(server)
        if (bare(c["remote_host"]), int(c["remote_port"])) != (host_address, HOST_PORT):
            raise CaseError(
                f"publish: the client reached {c['remote_host']}:{c['remote_port']}, not {host_address}:{HOST_PORT}"
            )
        if (bare(s["local_host"]), int(s["local_port"])) != (container, PORT):
            raise CaseError(f"publish: the server's end is {s['local_host']}:{s['local_port']}, not {container}:{PORT}")
        return {"outside_connected_to": f"{host_address}:{HOST_PORT}", "container_saw": bare(s["remote_host"])}

    return check


def plain_check(source: str) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, str]]:
    """No NAT: the server sees the client container's own address."""

    def check(client: dict[str, Any], server: dict[str, Any]) -> dict[str, str]:
        peer = bare(connected(server)["remote_host"])
        if peer != source:
            raise CaseError(f"c2c: the server saw {peer}, not the client container's {source}")
        return {"server_saw": peer}

    return check


def listening(lab: Lab, ns: str, port: int) -> bool:
    out = lab.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return f":{port}" in out


def iperf_once(lab: Lab, case: Case, seconds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One iperf3 run of ``case``: a one-off server, the client for ``seconds``; both JSONs."""
    server = lab.spawn(
        case.server,
        ["iperf3", "-s", "-1", "-J", "-B", case.bind, "-p", str(PORT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: server.poll() is not None or listening(lab, case.server, PORT),
            10,
            f"iperf3 server in {case.server}",
        )
        if server.poll() is not None:
            raise CaseError(
                f"iperf3 server in {case.server} exited ({server.returncode}): {server.communicate()[0][-300:]}"
            )
        argv = [
            "iperf3",
            "-c",
            case.target,
            "-p",
            str(case.port),
            "-t",
            str(seconds),
            "-J",
            "--connect-timeout",
            "3000",
        ]
        try:
            run = lab.run(case.client, argv, check=False, timeout=seconds + 12)
        except subprocess.TimeoutExpired as e:
            said = (e.stdout or b"")[-300:]
            raise CaseError(
                f"`{shlex.join(argv)}` in {case.client} did not finish within {seconds + 12} s: {said!r}"
            ) from None
        try:
            client = json.loads(run.stdout)
        except ValueError:
            raise CaseError(
                f"{shlex.join(argv)} in {case.client}: {(run.stderr or run.stdout).strip()[-300:]}"
            ) from None
        try:
            out, _ = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate(timeout=5)
        try:
            result = json.loads(out)
        except ValueError:
            result = {"error": f"no JSON from the server: {out.strip()[-300:]}"}
        return client, result
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)


def measure(lab: Lab, case: Case, seconds: int, procs: list[subprocess.Popen[Any]]) -> dict[str, Any]:
    """``case`` for ``seconds``, checked; Gbit/s as the receiver counted it, retransmits, what
    was verified, and the CPU seconds of ``procs`` (the agents) during the run."""
    error = ""
    for _ in range(IPERF_TRIES):
        if case.before is not None:
            case.before()
        before = cpu_seconds(procs)
        client, server = iperf_once(lab, case, seconds)
        cpu = cpu_seconds(procs) - before
        end = client.get("end", {})
        if "sum_received" not in end:
            error = client.get("error", "no summary in its output")
            continue
        verified = case.check(client, server)
        return {
            "gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
            "agent_cpu_s": cpu if procs else None,
            "verified": verified,
        }
    raise CaseError(f"iperf3 -c {case.target} -p {case.port} in {case.client} failed {IPERF_TRIES} times: {error}")


def mtu(lab: Lab, ns: str, ifname: str) -> int:
    return int(json.loads(lab.run(ns, ["ip", "-j", "link", "show", ifname]).stdout)[0]["mtu"])


def undo(lab: Lab, ns: str, argv: list[str]) -> Callable[[], None]:
    """A teardown step: ``argv`` in ``ns``, whatever it answers (the thing may be gone already)."""
    return lambda: None if lab.run(ns, argv, check=False) else None


def remove_netns(ns: str) -> Callable[[], None]:
    """A teardown step: delete namespace ``ns`` (from the root namespace), if it is still there."""
    return lambda: None if subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30) else None


def sysctl(lab: Lab, ns: str, key: str) -> str:
    return lab.run(ns, ["sysctl", "-n", key], check=False).stdout.strip() or "n/a"


# --- the kernel row ----------------------------------------------------------------------------


def setup_kernel(lab: Lab, outside: str) -> Plane:
    """Host KERNEL_HOST as Docker's bridge network, minus docker-proxy (module doc)."""
    plane, h = Plane("kernel"), lab.ns(KERNEL_HOST)
    host_address = str(lab.address(KERNEL_HOST))
    try:
        ns = lab.add_container("kc")
        plane.undo.append(remove_netns(ns))
        lab.run(h, ["ip", "link", "add", KERNEL_BRIDGE, "type", "bridge"])
        plane.undo.append(undo(lab, h, ["ip", "link", "del", KERNEL_BRIDGE]))
        lab.run(h, ["ip", "addr", "add", str(KERNEL_GATEWAY), "dev", KERNEL_BRIDGE])
        lab.run(h, ["ip", "link", "set", KERNEL_BRIDGE, "up"])
        lab.run(h, ["ip", "link", "add", KERNEL_VETH, "type", "veth", "peer", "name", "eth0", "netns", ns])
        plane.undo.append(undo(lab, h, ["ip", "link", "del", KERNEL_VETH]))
        lab.run(h, ["ip", "link", "set", KERNEL_VETH, "master", KERNEL_BRIDGE, "up"])
        lab.run(ns, ["ip", "addr", "add", str(KERNEL_CONTAINER), "dev", "eth0"])
        lab.run(ns, ["ip", "link", "set", "eth0", "up"])
        lab.run(ns, ["ip", "route", "add", "default", "via", str(KERNEL_GATEWAY.ip)])
        forwarding = sysctl(lab, h, "net.ipv4.ip_forward")
        lab.run(h, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        plane.undo.append(undo(lab, h, ["sysctl", "-q", "-w", f"net.ipv4.ip_forward={forwarding}"]))
        lab.run(h, ["nft", "-f", "-"], input=nft_ruleset())
        plane.undo.append(undo(lab, h, ["nft", "delete", "table", "ip", NFT_TABLE]))
        container = str(KERNEL_CONTAINER.ip)
        outside_ip = str(lab.address(outside))
        wait_for(
            lambda: lab.run(ns, ["ping", "-c", "1", "-W", "1", outside_ip], check=False).returncode == 0,
            10,
            f"a ping from the kernel row's container to the outside {outside_ip}",
        )
        plane.cases["egress"] = Case(ns, outside, outside_ip, outside_ip, PORT, egress_check(host_address, container))
        plane.cases["publish"] = Case(
            outside, ns, container, host_address, HOST_PORT, publish_check(host_address, container)
        )
        plane.facts = {
            "ns": ns,
            "host": lab.ns(KERNEL_HOST),
            "host_underlay": host_address,
            "container": container,
            "container_mtu": mtu(lab, ns, "eth0"),
            "bridge_nf_call_iptables": sysctl(lab, h, "net.bridge.bridge-nf-call-iptables"),
            "nft": nft_ruleset(),
        }
    except BaseException:
        plane.teardown()
        raise
    return plane


def set_kernel_mtu(lab: Lab, container_ns: str, value: int) -> Callable[[], None]:
    """A Case.before: the kernel row's veth pair at ``value`` (dk0 follows its one port). TCP
    takes its MSS from it when a connection is made, so it holds from the next run on."""

    def before() -> None:
        lab.run(KERNEL_HOST, ["ip", "link", "set", KERNEL_VETH, "mtu", str(value)])
        lab.run(container_ns, ["ip", "link", "set", "eth0", "mtu", str(value)])

    return before


def mtu_variant(lab: Lab, kernel: Plane, value: int) -> Plane:
    """``kernel`` as two rows on the same namespaces: its own cases at MTU 1500 (Docker's) and
    "kernel-mtu" at ``value`` (the overlay container's), each setting the MTU before it runs;
    the variant's teardown is the kernel row's."""
    ns = kernel.facts["ns"]
    for name, case in kernel.cases.items():
        kernel.cases[name] = replace(case, before=set_kernel_mtu(lab, ns, 1500))
    variant = Plane("kernel-mtu", facts={**kernel.facts, "container_mtu": value})
    variant.cases = {n: replace(c, before=set_kernel_mtu(lab, ns, value)) for n, c in kernel.cases.items()}
    return variant


# --- the overlay row ---------------------------------------------------------------------------


def setup_overlay(lab: Lab, outside: str, etcd: str, workdir: Path) -> Plane:
    """Agents on OVERLAY_HOSTS in etcd mode, network blue with its gateway, a container on host 2
    (egress, publish) and one on host 1 (the reference). A failure of the agents or of attach
    raises (no case can run); a case whose own part fails (the way out, publish) is recorded in
    ``failed`` with the commands and their output, and the others go on."""
    plane = Plane("overlay")
    logs = {h: workdir / f"agent-h{h}.log" for h in OVERLAY_HOSTS}

    def log_tail(h: int) -> str:
        text = logs[h].read_text(errors="replace") if logs[h].exists() else ""
        return "\n".join(text.splitlines()[-15:]) or "(empty)"

    def stop_agents() -> None:
        for p in plane.procs:
            if p.poll() is None:
                p.terminate()
        for p in plane.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def run(host: int | str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` in ``host``; CaseError with the command and its output if it fails."""
        result = lab.run(host, argv, check=False, timeout=timeout)
        if result.returncode != 0:
            where = lab.ns(host) if isinstance(host, int) else host
            said = (result.stderr + result.stdout).strip()[-1500:]
            shown = "overlay " + shlex.join(argv[3:]) if argv[:3] == OVERLAY else shlex.join(argv)
            raise CaseError(f"`{shown}` in {where} exited {result.returncode}: {said}")
        return result

    try:
        created = run(
            1,
            [
                *OVERLAY,
                "net",
                "create",
                str(VNI),
                "--name",
                NET_NAME,
                "--subnet",
                SUBNET,
                "--gateway",
                GATEWAY,
                "--etcd",
                etcd,
            ],
        )
        plane.facts["net_create"] = created.stdout.strip()
        plane.undo.append(stop_agents)
        for h in OVERLAY_HOSTS:
            with logs[h].open("w") as log:
                plane.procs.append(
                    lab.spawn(
                        h,
                        [
                            *OVERLAY,
                            "agent",
                            *("--etcd", etcd, "--host-id", f"h{h}", "--local", str(lab.address(h))),
                            *("--network", str(VNI), "--state-dir", str(workdir / f"state-h{h}")),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for h, p in zip(OVERLAY_HOSTS, plane.procs):

            def up(h: int = h, p: subprocess.Popen[Any] = p) -> bool:
                if p.poll() is not None:
                    raise CaseError(f"the agent on host {h} exited ({p.returncode}); its log ends:\n{log_tail(h)}")
                return lab.run(h, [*OVERLAY, "status"], check=False).returncode == 0

            wait_for(up, 30, f"the agent on host {h} (`overlay status`)")
        attached: dict[int, dict[str, Any]] = {}
        for h in OVERLAY_HOSTS:
            ns = lab.add_container(f"oc{h}")
            plane.undo.append(remove_netns(ns))
            out = run(h, [*OVERLAY, "attach", ns, "--net", NET_NAME, "--json"])
            attached[h] = {**json.loads(out.stdout), "ns": ns}
        c1, c2 = attached[1], attached[2]
        a1, a2 = bare(c1["address"]), bare(c2["address"])
        plane.facts.update(
            hosts=[lab.ns(h) for h in OVERLAY_HOSTS],
            host_underlay=str(lab.address(2)),
            container=a2,
            container_h1=a1,
            container_mtu=mtu(lab, c2["ns"], c2["ifname"]),
            attach_h2=c2,
            bridge_nf_call_iptables=sysctl(lab, lab.ns(2), "net.bridge.bridge-nf-call-iptables"),
        )
        wait_for(
            lambda: lab.run(c1["ns"], ["ping", "-c", "1", "-W", "1", a2], check=False).returncode == 0,
            20,
            f"a ping from {a1} (host 1) to {a2} (host 2) over the overlay",
        )
        plane.cases["c2c"] = Case(c1["ns"], c2["ns"], a2, a2, PORT, plain_check(a1))
    except BaseException:
        plane.teardown()
        raise

    host_address, outside_ip = str(lab.address(2)), str(lab.address(outside))
    plane.diagnose = lambda: diagnosis(lab, c2["ns"], log_tail(2))
    routes = lab.run(c2["ns"], ["ip", "route"], check=False).stdout.strip()
    plane.facts["container_routes"] = routes
    try:
        if f"default via {GATEWAY}" not in routes:
            raise CaseError(
                f"`overlay attach` gave the container no default route via the gateway {GATEWAY}; `ip route` in it:\n{routes}"
            )
        try:
            wait_for(
                lambda: lab.run(c2["ns"], ["ping", "-c", "1", "-W", "1", outside_ip], check=False).returncode == 0,
                20,
                f"a ping from the container {a2} on host 2 to the outside {outside_ip}",
            )
        except TimeoutError as e:
            raise CaseError(f"{e}\n{diagnosis(lab, c2['ns'], log_tail(2))}") from None
        plane.cases["egress"] = Case(c2["ns"], outside, outside_ip, outside_ip, PORT, egress_check(host_address, a2))
    except CaseError as e:
        plane.failed["egress"] = str(e)
    try:
        out = run(2, [*OVERLAY, "publish", c2["ns"], f"{HOST_PORT}:{PORT}"])
        plane.facts["publish"] = out.stdout.strip()
        plane.facts["nft"] = lab.run(2, ["nft", "list", "table", "inet", "overlay"], check=False).stdout
        plane.cases["publish"] = Case(outside, c2["ns"], a2, host_address, HOST_PORT, publish_check(host_address, a2))
    except CaseError as e:
        plane.failed["publish"] = f"{e}\n{diagnosis(lab, c2['ns'], log_tail(2))}"
    return plane


def diagnosis(lab: Lab, container: str, agent_log: str) -> str:
    """What host 2 and its container look like, for a failure's report."""
    parts = []
    for where, argv in (
        (lab.ns(2), ["ip", "-br", "addr"]),
        (lab.ns(2), ["ip", "-br", "link"]),
        (lab.ns(2), ["sysctl", "net.ipv4.ip_forward"]),
        (lab.ns(2), ["sysctl", "net.bridge.bridge-nf-call-iptables", "net.ipv4.conf.ovbr42.arp_ignore"]),
        (lab.ns(2), ["nft", "list", "ruleset"]),
        (lab.ns(2), ["grep", "-E", f"dport=({PORT}|{HOST_PORT}) ", "/proc/net/nf_conntrack"]),
        (container, ["ip", "-br", "addr"]),
        (container, ["ip", "route"]),
        (container, ["ip", "neigh"]),
        (container, ["nstat", "-az", "TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpRetransSegs"]),
    ):
        r = lab.run(where, argv, check=False)
        parts.append(f"$ {shlex.join(argv)}   # in {where}\n{(r.stdout + r.stderr).strip()[-1500:]}")
    return "\n".join(parts) + f"\nthe agent's log on host 2 ends:\n{agent_log}"


# --- the run -----------------------------------------------------------------------------------


def preflight(lab: Lab, plane: Plane) -> None:
    """Each case once, 1 s, with its checks, before the rounds: a case that fails moves to
    ``plane.failed``."""
    for name, case in list(plane.cases.items()):
        try:
            got = measure(lab, case, 1, plane.procs)
            print(
                f"... {plane.name:7} {name:7} verified: {got['verified']} ({got['gbps']:.2f} Gbit/s in 1 s)", flush=True
            )
        except (CaseError, TimeoutError) as e:
            why = f"{e}\n{plane.diagnose()}" if plane.diagnose else str(e)
            print(f"... {plane.name:7} {name:7} FAILED: {why}", flush=True)
            plane.failed[name] = why
            del plane.cases[name]


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    iperf = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "iperf3": iperf[0] if iperf else "unknown",
        "note": "2 shared, noisy cores: read the ratios and the per-round spread, not single absolute figures",
    }


BRIDGE_NF = ("iptables", "ip6tables", "arptables")


def set_bridge_nf(lab: Lab, value: int) -> None:
    """net.bridge.bridge-nf-call-{iptables,ip6tables,arptables} in every host namespace."""
    for h in range(1, lab.hosts + 1):
        lab.run(h, ["sysctl", "-q", "-w", *(f"net.bridge.bridge-nf-call-{t}={value}" for t in BRIDGE_NF)])


def run(rounds: int, seconds: int, workdir: Path, bridge_nf: int | None = None) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {p: [] for p in planes} for c, (_, planes) in CASES.items()
    }
    failed: dict[str, dict[str, str]] = {p: {} for p in PLANES}
    facts: dict[str, Any] = {}
    planes: dict[str, Plane] = {}
    etcd: etcdlab.EtcdServer | None = None
    with Lab(f"eg{os.getpid() % 10000}", hosts=3) as lab:
        try:
            outside = OUTSIDE
            lab.add_service(OUTSIDE, OUTSIDE_HOST)
            if bridge_nf is not None:
                set_bridge_nf(lab, bridge_nf)
            print(f"... lab {lab.name}: hosts 1-3, the outside at {lab.address(OUTSIDE)}", flush=True)
            print("... kernel: setting up (host 3: dk0, veth, nft masquerade + dnat)", flush=True)
            planes["kernel"] = setup_kernel(lab, outside)
            print("... overlay: setting up (etcd, agents on hosts 1 and 2, attach, publish)", flush=True)
            try:
                etcd = etcdlab.single(lab)
                planes["overlay"] = setup_overlay(lab, outside, etcd.endpoint, workdir)
            except (LabError, TimeoutError, etcdlab.EtcdError) as e:
                print(f"... overlay FAILED to set up: {e}", flush=True)
                failed["overlay"] = {
                    c: f"the overlay row could not be set up: {e}" for c, (_, ps) in CASES.items() if "overlay" in ps
                }
                failed["kernel-mtu"] = {c: "no overlay row, so no overlay MTU to match" for c in ("egress", "publish")}
            else:
                planes["kernel-mtu"] = mtu_variant(lab, planes["kernel"], planes["overlay"].facts["container_mtu"])
            for plane in planes.values():
                for name, why in plane.failed.items():
                    print(f"... {plane.name:7} {name:7} FAILED: {why}", flush=True)
                preflight(lab, plane)
                failed[plane.name].update(plane.failed)
                facts[plane.name] = plane.facts
            for r in range(rounds):
                order = list(PLANES) if r % 2 == 0 else list(reversed(PLANES))
                for case, (_, case_planes) in CASES.items():
                    for name in (n for n in order if n in case_planes):
                        p = planes.get(name)
                        if p is None or case not in p.cases:
                            continue
                        print(f"... round {r + 1}/{rounds}  {case:7}  {name}", flush=True)
                        try:
                            results[case][name].append(measure(lab, p.cases[case], seconds, p.procs))
                        except (CaseError, TimeoutError) as e:
                            print(f"... {name} {case} FAILED in round {r + 1}: {e}", flush=True)
                            failed[name][case] = f"round {r + 1}: {e}"
                            del p.cases[case]
        finally:
            for plane in reversed(list(planes.values())):
                plane.teardown()
            if etcd is not None:
                etcd.stop()
    return {"results": results, "failed": {p: f for p, f in failed.items() if f}, "facts": facts}


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per case: per dataplane (``planes``) the median Gbit/s and the rounds' values, and
    (``ratios``) each of RATIOS measured on both: the ratio of the medians and per round."""
    out: dict[str, Any] = {}
    for case, planes in results.items():
        entry: dict[str, Any] = {}
        for name, rs in planes.items():
            vals = [r["gbps"] for r in rs]
            cpu = [r["agent_cpu_s"] for r in rs if r.get("agent_cpu_s") is not None]
            entry[name] = {
                "median_gbps": statistics.median(vals) if vals else None,
                "rounds_gbps": vals,
                "retransmits": [r.get("retransmits") for r in rs],
                "agent_cpu_s": cpu or None,
            }
        ratios = {}
        for top, bottom in RATIOS:
            a, b = entry.get(top, {}), entry.get(bottom, {})
            if b.get("median_gbps") and a.get("median_gbps") is not None:
                per_round = [x / y for x, y in zip(a["rounds_gbps"], b["rounds_gbps"]) if y]
                ratios[f"{top}/{bottom}"] = {"ratio": a["median_gbps"] / b["median_gbps"], "rounds": per_round}
        out[case] = {"planes": entry, "ratios": ratios}
    return out


def report(data: dict[str, Any]) -> str:
    """The markdown of a run: the table, what was verified, the setups, failures, the machine."""
    args, summary, failed, facts, m = data["args"], data["summary"], data["failed"], data["facts"], data["machine"]

    def cell(case: str, name: str) -> str:
        if name not in CASES[case][1]:
            return "n/a"
        e = summary[case]["planes"].get(name, {})
        if e.get("median_gbps") is None:
            return "not measured"
        rounds = ", ".join(f"{v:.2f}" for v in e["rounds_gbps"])
        return f"**{e['median_gbps']:.2f}** ({rounds})"

    def ratio(case: str, key: str) -> str:
        r = summary[case]["ratios"].get(key)
        if not r:
            return "-"
        rounds = f" ({', '.join(f'{x:.2f}' for x in r['rounds'])})" if len(r["rounds"]) > 1 else ""
        return f"**{r['ratio']:.2f}**{rounds}"

    bnf = args.get("bridge_nf_call_iptables")
    k, o = facts.get("kernel", {}), facts.get("overlay", {})
    kernel_mtu = facts.get("kernel-mtu", {}).get("container_mtu")
    labels = {**LABELS, **({"kernel-mtu": f"kernel at overlay's MTU ({kernel_mtu})"} if kernel_mtu else {})}
    keys = [f"{a}/{b}" for a, b in RATIOS]
    lines = [
        "# Containers reach out and are reached: overlay vs the kernel alone (Docker-style)",
        "",
        f"iperf3 TCP, 1 stream, {args['seconds']} s per run, {args['rounds']} round(s), interleaved: in each round "
        "every case runs on every dataplane back to back (their order reversed every other round). "
        "Gbit/s: median in bold, each round's value in brackets; ratios of the medians, per-round ratios in brackets. "
        + (
            f"net.bridge.bridge-nf-call-iptables={bnf} set by the bench in every host namespace."
            if bnf is not None
            else "Host namespaces as the lab makes them (net.bridge.bridge-nf-call-iptables="
            + f"{k.get('bridge_nf_call_iptables', '?')}: br_netfilter is built into this kernel, as on a Docker host)."
        ),
        "",
        "| case | " + " | ".join(labels[p] for p in PLANES) + " | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * (len(PLANES) + len(keys)),
    ]
    for case, (label, _) in CASES.items():
        lines.append(
            f"| {label} | "
            + " | ".join(cell(case, p) for p in PLANES)
            + " | "
            + " | ".join(ratio(case, key) for key in keys)
            + " |"
        )
    lines += ["", "## Verified in every run (each iperf3 server is a one-off; its JSON says who it talked to)", ""]
    for case in CASES:
        for name, rs in data["results"][case].items():
            if rs:
                seen = sorted({json.dumps(r["verified"], sort_keys=True) for r in rs})
                lines.append(
                    f"- {case}, {name}: "
                    + "; ".join(", ".join(f"{a} {b}" for a, b in json.loads(x).items()) for x in seen)
                )
    cpu = [(case, summary[case]["planes"].get("overlay", {}).get("agent_cpu_s")) for case in CASES]
    if any(vals for _, vals in cpu):
        lines += [
            "",
            "The agents' CPU seconds (both, user + system) during each overlay run: "
            + "; ".join(f"{case} {', '.join(f'{v:.2f}' for v in vals)}" for case, vals in cpu if vals),
        ]
    retr = [
        f"{case}/{name} {', '.join(str(x) for x in e['retransmits'])}"
        for case in CASES
        for name, e in summary[case]["planes"].items()
        if e.get("retransmits")
    ]
    if retr:
        lines += ["", "TCP retransmits per run: " + "; ".join(retr)]
    lines += ["", "## Setup", ""]
    if k:
        lines.append(
            f"- kernel: {k['host']} ({k['host_underlay']}): bridge {KERNEL_BRIDGE} {KERNEL_GATEWAY}, veth {KERNEL_VETH} to "
            f"the container {k['container']} (MTU {k['container_mtu']}; `kernel-mtu`: the same veth pair set to the "
            f"overlay container's MTU before each of its runs), ip_forward=1, nft table `ip {NFT_TABLE}` (below); "
            f"bridge-nf-call-iptables={k['bridge_nf_call_iptables']}"
        )
    if o:
        lines.append(
            f"- overlay: agents in etcd mode on {', '.join(o['hosts'])}; network {VNI} `{NET_NAME}` {SUBNET} gateway "
            f"{GATEWAY} (`{o.get('net_create', '')}`); the container on host 2 {o['container']} (MTU "
            f"{o['container_mtu']}), the one on host 1 {o['container_h1']}; `overlay publish`: "
            f"`{o.get('publish', 'n/a')}`; bridge-nf-call-iptables={o['bridge_nf_call_iptables']}"
        )
    lines.append(
        f"- the outside: lab service `{OUTSIDE}` at 198.18.0.{OUTSIDE_HOST} on the underlay bridge, "
        "no route to 198.19.0.0/16"
    )
    if failed:
        lines += ["", "## Not measured", ""]
        for name, cases in failed.items():
            for case, why in cases.items():
                lines += [f"- {name} / {case}:", "", "```", why, "```", ""]
    lines += ["", f"Machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}, {m['iperf3']}. {m['note']}."]
    if k:
        lines += ["", f"The kernel row's table (`nft -f` in {k['host']}):", "", "```", k["nft"].rstrip(), "```"]
    if o.get("nft"):
        lines += ["", "The overlay agent's table on host 2 after the publish (`nft list table inet overlay`):", ""]
        lines += ["```", o["nft"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--bridge-nf-call-iptables",
        type=int,
        choices=(0, 1),
        help="set net.bridge.bridge-nf-call-{iptables,ip6tables,arptables} in every host namespace (both rows); "
        "default: leave the namespaces' own value (1 here: br_netfilter is built in, as on a Docker host)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the bench builds network namespaces: run it as root")
    signal.signal(signal.SIGTERM, on_sigterm(os.getpid()))  # so the lab is torn down
    rounds, seconds = (1, 2) if args.quick else (args.rounds, args.seconds)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="overlay-egress-") as tmp:
        data = run(rounds, seconds, Path(tmp), args.bridge_nf_call_iptables)
    data = {
        "args": {
            "rounds": rounds,
            "seconds": seconds,
            "quick": args.quick,
            "bridge_nf_call_iptables": args.bridge_nf_call_iptables,
        },
        "command": shlex.join([".venv/bin/python", "-m", "bench.egress", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "summary": summarize(data["results"]),
        "elapsed_s": round(time.monotonic() - started, 1),
        **data,
    }
    text = report(data)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "egress.md").write_text(text)
    (args.out / "egress.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "command.txt").write_text(
        data["command"] + f"   # as root, in /work/main; took {data['elapsed_s']} s\n"
    )
    print(f"written: {args.out}/egress.md, egress.json, command.txt ({data['elapsed_s']} s)")
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
