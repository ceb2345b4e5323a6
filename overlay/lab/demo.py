"""`overlay demo`: containers of two tenants on two overlay networks across three hosts, with a
real etcd; shows that same-network pairs talk and cross-network pairs do not; then cleanup.

What an operator would do by hand, in one command:
- the lab (overlay/lab/netns.py): hosts as network namespaces on an underlay bridge, and etcd in a
  namespace of its own (overlay/lab/etcd.py);
- `overlay net create` for networks blue (VNI 42) and red (VNI 43, encrypted: every datagram
  between hosts sealed with the hosts' session keys, plaintext VXLAN for it refused);
- `overlay agent` in etcd mode on every host, joined to both networks (a bridge per network);
- two containers per host (bare network namespaces), one on each network, put there with
  `overlay attach` (addresses allocated from the network's subnet in etcd);
- a ping between every pair of containers. Each container also gets an on-link route to the
  other network's subnet, so a cross-network ping really tries (ARP goes out) and fails only
  because the overlay keeps the networks apart;
- the way out and in (IPv4 demo): each network has a gateway (198.19.<vni>.1, the same address
  and MAC on every host) with egress NAT; a namespace standing for the internet (198.18.0.210 on
  the underlay) sees a container's connection come from its host's address; a port published
  with `overlay publish b1 8080:80` answers the internet on host 1's address; a container on
  host 3 finds b1 by name through its gateway's DNS (`b1` and `b1.blue`);
- `overlay host ls`, the registry as etcd holds it, one agent's status.
Everything is removed at the end, also after an error or Ctrl-C.

With ``ipv6=True`` (`overlay demo --ipv6`) the same on an IPv6-only underlay (2001:2:0:1::/64:
the agents run with ``--local <their IPv6 address>``, etcd listens on 2001:2:0:1::250), and the
networks are dual-stack (``--subnet6 2001:2:0:<vni>::/64`` beside their IPv4 subnet), so every
container also gets an IPv6 address from `overlay attach` and the ping matrix runs over IPv4
and over IPv6 (``ping -6``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from overlay.lab import Lab, LabError, wait_for
from overlay.lab import etcd as etcdlab

NETWORKS = {"blue": 42, "red": 43}
ENCRYPTED = {"red"}  # networks made with --encrypted


def subnet(vni: int) -> str:
    return f"198.19.{vni}.0/24"


def subnet6(vni: int) -> str:
    """A network's IPv6 subnet: 2001:2:0:<vni>::/64, the VNI's decimal digits as the group
    (mirroring 198.19.<vni>.0/24)."""
    return f"2001:2:0:{vni}::/64"


def gateway(vni: int) -> str:
    """A network's gateway (IPv4 demo): 198.19.<vni>.1 on every host."""
    return f"198.19.{vni}.1"


# A TCP server in a container or the internet: answers each connection with a label and the
# address the connection came from (bounded: 30 s, 10 connections).
WHOAMI = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
s.settimeout(1)
print("listening", flush=True)
end, served = time.monotonic() + 30, 0
while time.monotonic() < end and served < 10:
    try:
        c, peer = s.accept()
    except socket.timeout:
        continue
    c.sendall((sys.argv[3] + " saw " + peer[0]).encode())
    c.close()
    served += 1
"""
ASK = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(200).decode())
except OSError as e:
    print("no answer:", e)
"""
LOOKUP = """
import sys
import dns.message, dns.query
try:
    r = dns.query.udp(dns.message.make_query(sys.argv[2], "A"), sys.argv[1], timeout=3)
    print(" ".join(rr.to_text() for a in r.answer for rr in a) or "no answer")
except Exception as e:
    print("no answer:", e.__class__.__name__)
"""


def _egress(lab: Lab, overlay: list[str], containers: dict[str, tuple[int, str, str]]) -> bool:
    """The way out and in (module doc); whether all three worked."""
    print("\nthe way out and in: gateways 198.19.42.1 (blue) and 198.19.43.1 (red) on every host, egress NAT")
    internet = lab.add_service("internet", 210)
    servers = []
    try:

        def serve(ns: str, address: str, port: int, label: str) -> None:
            proc = lab.spawn(
                ns, [sys.executable, "-c", WHOAMI, address, str(port), label], stdout=subprocess.PIPE, text=True
            )
            servers.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "listening":
                raise LabError(f"a demo server in {ns} did not start")

        def ask(ns: str, address: str, port: int) -> str:
            return lab.run(ns, [sys.executable, "-c", ASK, address, str(port)], timeout=15).stdout.strip()

        serve(internet, "198.18.0.210", 80, "the internet (198.18.0.210)")
        said = ask(lab.container_ns("b2"), "198.18.0.210", 80)
        out_ok = said.endswith(f"saw {lab.address(2)}")
        print(f"  b2 (host 2) -> 198.18.0.210:80: {said}  (host 2's address: masqueraded)")
        published = lab.run(1, [*overlay, "publish", "b1", "8080:80"], check=False)
        print(f"  host 1: overlay publish b1 8080:80 -> {(published.stdout or published.stderr).strip()}")
        serve(lab.container_ns("b1"), "0.0.0.0", 80, "b1")
        said = ask(internet, str(lab.address(1)), 8080)
        in_ok = said == "b1 saw 198.18.0.210"
        print(f"  the internet -> {lab.address(1)}:8080: {said}")
        found = lab.run(lab.container_ns("b3"), [sys.executable, "-c", LOOKUP, "198.19.42.1", "b1.blue"], timeout=15)
        name_ok = found.stdout.strip() == containers["b1"][2]
        print(f"  b3 (host 3) asks its gateway 198.19.42.1 for b1.blue: {found.stdout.strip()}")
        return out_ok and in_ok and name_ok
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()


def _bare(address: str) -> str:
    return address.split("/")[0]


def _ipv6_ready(lab: Lab, ns: str, ifname: str) -> bool:
    """Whether ``ifname`` in ``ns`` has an IPv6 address that is no longer tentative (DAD done);
    LabError if duplicate address detection failed."""

    def shown(*flags: str) -> str:
        return lab.run(ns, ["ip", "-6", "-o", "addr", "show", "dev", ifname, "scope", "global", *flags]).stdout

    if shown("dadfailed").strip():
        raise LabError(f"duplicate address detection failed in {ns}: {shown().strip()}")
    return bool(shown().strip()) and not shown("tentative").strip()


def main(hosts: int = 3, ipv6: bool = False) -> int:
    if os.geteuid() != 0:
        print("overlay: error: the demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    if not 2 <= hosts <= 20:
        print("overlay: error: --hosts must be 2 to 20", file=sys.stderr)
        return 2
    overlay = [sys.executable, "-m", "overlay"]
    logs = Path(tempfile.mkdtemp(prefix="overlay-demo-"))
    lab = Lab(f"demo{os.getpid() % 10000}", hosts=hosts, ipv6=ipv6)
    families = ("IPv4", "IPv6") if ipv6 else ("IPv4",)
    etcd = None
    try:
        underlay = "2001:2:0:1::/64 (IPv6 only)" if ipv6 else "198.18.0.0/24"
        print(f"lab: {hosts} hosts as network namespaces on a bridge, underlay {underlay}")
        lab.up()
        etcd = etcdlab.single(lab)
        print(f"etcd: {etcd.endpoint} in namespace {etcd.namespace} (data in {etcd.data_dir})")
        for name, vni in NETWORKS.items():
            v6 = ["--subnet6", subnet6(vni)] if ipv6 else ["--gateway", gateway(vni)]
            v6 += ["--encrypted"] if name in ENCRYPTED else []
            out = lab.run(
                1,
                [
                    *overlay,
                    *("net", "create", str(vni), "--name", name, "--subnet", subnet(vni), *v6),
                    *("--etcd", etcd.endpoint),
                ],
            )
            print(f"  {out.stdout.strip()}")
        for h in range(1, hosts + 1):
            log = open(logs / f"agent-h{h}.log", "w")
            lab.spawn(
                h,
                [
                    *overlay,
                    "agent",
                    "--etcd",
                    etcd.endpoint,
                    "--host-id",
                    f"h{h}",
                    "--local",
                    str(lab.address(h)),
                    "--state-dir",
                    str(logs / "state"),
                    *("--resolv-conf", "/dev/null"),  # no upstream resolvers: the demo asks nothing off the machine
                    *[a for vni in NETWORKS.values() for a in ("--network", str(vni))],
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for h in range(1, hosts + 1):
            wait_for(
                lambda h=h: lab.run(h, [*overlay, "status"], check=False).returncode == 0,
                30,
                f"the agent on host {h} (log: {logs}/agent-h{h}.log)",
            )
            print(
                f"  host {h}: {lab.ns(h)}  underlay {lab.address(h)}  agent h{h} up, bridges "
                f"{', '.join(f'ovbr{v}' for v in NETWORKS.values())}"
            )

        print("\ncontainers (namespaces), attached with 'overlay attach <netns> --net <network>':")
        containers: dict[str, tuple[int, str, str]] = {}  # name -> (host, network, address)
        addresses6: dict[str, tuple[str, str]] = {}  # name -> (its IPv6 address, its interface); ipv6 only
        for h in range(1, hosts + 1):
            for name, vni in NETWORKS.items():
                c = f"{name[0]}{h}"
                ns = lab.add_container(c)
                out = lab.run(h, [*overlay, "attach", ns, "--net", name, "--name", c, "--json"])
                a = json.loads(out.stdout)
                containers[c] = (h, name, _bare(a["address"]))
                other = next(v for n, v in NETWORKS.items() if n != name)
                lab.run(ns, ["ip", "route", "add", subnet(other), "dev", a["ifname"]])
                shown6 = ""
                if ipv6:
                    if not a.get("address6"):
                        raise LabError(f"'overlay attach {ns} --net {name}' gave no IPv6 address: {out.stdout.strip()}")
                    addresses6[c] = (_bare(a["address6"]), a["ifname"])
                    lab.run(ns, ["ip", "-6", "route", "add", subnet6(other), "dev", a["ifname"]])
                    shown6 = f"{a['address6']:22} "
                print(
                    f"  {c:4} on host {h}  network {name:4} (VNI {vni})  {a['address']:16} {shown6}{a['mac']}  "
                    f"[{lab.container_ns(c)}]"
                )
        for c, (_, ifname) in addresses6.items():  # pings from a tentative address would go nowhere
            wait_for(
                lambda c=c, ifname=ifname: _ipv6_ready(lab, lab.container_ns(c), ifname),
                10,
                f"the IPv6 address of container {c} to leave the tentative state",
            )

        def target(family: str, dst: str) -> list[str]:
            return ["-6", addresses6[dst][0]] if family == "IPv6" else [containers[dst][2]]

        over = " (IPv4, then IPv6)" if ipv6 else ""
        print(f"\npings between every pair of containers{over} (ok = answered, -- = no answer):")
        answered: dict[tuple[str, str, str], bool] = {}
        for family in families:  # one family at a time: all its pings at once
            pings = {
                (family, src, dst): lab.spawn(
                    lab.container_ns(src),
                    # 2 answers within 6 s: the first frames of an encrypted network wait for a handshake
                    ["ping", "-n", "-c", "2", "-i", "0.2", "-w", "6", *target(family, dst)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for src in containers
                for dst in containers
                if src != dst
            }
            answered |= {key: proc.wait(timeout=30) == 0 for key, proc in pings.items()}
        names = list(containers)
        for family in families:
            if ipv6:
                print(f"  {family}:")
            print("  from \\ to  " + " ".join(f"{n:>4}" for n in names))
            for src in names:
                cells = ["    " if src == dst else ("  ok" if answered[family, src, dst] else "  --") for dst in names]
                print(f"  {src:10} " + " ".join(cells))
        wrong = [(f, s, d) for (f, s, d), ok in answered.items() if ok != (containers[s][1] == containers[d][1])]
        pairs = [(s, d) for (f, s, d) in answered if f == "IPv4"]
        same = sum(1 for (s, d) in pairs if containers[s][1] == containers[d][1])
        egress_ok = True if ipv6 else _egress(lab, overlay, containers)

        print(f"\nhost 1: overlay host ls --etcd {etcd.endpoint}   (KEY: each host's key fingerprint)")
        print(lab.run(1, [*overlay, "host", "ls", "--etcd", etcd.endpoint]).stdout)
        print(f"host 1: overlay net ls --etcd {etcd.endpoint}")
        print(lab.run(1, [*overlay, "net", "ls", "--etcd", etcd.endpoint]).stdout)
        print("the registry in etcd (etcdctl get --prefix /overlay/v1/networks/42):")
        for line in etcdlab.etcdctl(etcd, "get", "--prefix", "/overlay/v1/networks/42", check=True).stdout.splitlines():
            print(f"  {line}")
        print("\nhost 1: overlay status")
        print(lab.run(1, [*overlay, "status"]).stdout)
        if wrong or not egress_ok:
            print(
                "result: FAILED: "
                + ", ".join(
                    [
                        f"{s}->{d}{' ' + f if ipv6 else ''} {'answered' if answered[f, s, d] else 'unanswered'}"
                        for f, s, d in wrong
                    ]
                    + ([] if egress_ok else ["the way out and in (see above)"])
                )
                + "; removing the lab"
            )
            return 1
        both = " (over IPv4 and IPv6, on an IPv6-only underlay)" if ipv6 else ""
        reach = "" if ipv6 else "; containers reach out, are reached on a published port and found by name"
        print(
            f"result: all {same} same-network pairs talk, all {len(pairs) - same} cross-network pairs are "
            f"kept apart{both}{reach}; removing the lab"
        )
        return 0
    except (LabError, TimeoutError, etcdlab.EtcdError) as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 1
    finally:
        lab.down()
        if etcd is not None:
            etcd.stop()
