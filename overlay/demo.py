"""`overlay demo`: a lab of hosts and a real etcd, an agent on each host, pings between every
pair, then cleanup.

What an operator would do by hand, in one command: the lab (overlay/lab.py) with etcd in a
namespace of its own on the underlay (overlay/etcdlab.py), `overlay agent` in etcd mode on
every host (they find each other through etcd), `ping` over the overlay, the registry as etcd
holds it, and `overlay status` and `overlay fdb` of host 1. Everything is removed at the end,
also after an error or Ctrl-C.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from overlay import etcdlab
from overlay.lab import Lab, LabError, wait_for

VNI = 42


def overlay_ip(host: int) -> str:
    return f"198.19.{VNI}.{host}"


def main(hosts: int = 3) -> int:
    if os.geteuid() != 0:
        print("overlay: error: the demo builds network namespaces: run it as root", file=sys.stderr)
        return 1
    if not 2 <= hosts <= 20:
        print("overlay: error: --hosts must be 2 to 20", file=sys.stderr)
        return 2
    overlay = [sys.executable, "-m", "overlay.cli"]
    logs = Path(tempfile.mkdtemp(prefix="overlay-demo-"))
    lab = Lab(f"demo{os.getpid() % 10000}", hosts=hosts)
    etcd = None
    try:
        print(f"lab: {hosts} hosts as network namespaces on a bridge, underlay 198.18.0.0/24")
        lab.up()
        etcd = etcdlab.single(lab)
        print(f"etcd: {etcd.endpoint} in namespace {etcd.namespace} (data in {etcd.data_dir})")
        for h in range(1, hosts + 1):
            log = open(logs / f"agent-h{h}.log", "w")
            lab.spawn(h, [*overlay, "agent", "--etcd", etcd.endpoint, "--host-id", f"h{h}", "--network", str(VNI),
                          "--local", str(lab.address(h)), "--address", f"{overlay_ip(h)}/24",
                          "--mac", f"02:00:00:00:{VNI:02x}:{h:02x}"],
                      stdout=log, stderr=subprocess.STDOUT)
        for h in range(1, hosts + 1):
            wait_for(lambda h=h: lab.run(h, [*overlay, "status"], check=False).returncode == 0, 30,
                     f"the agent on host {h} (log: {logs}/agent-h{h}.log)")
            print(f"  host {h}: {lab.ns(h)}  underlay {lab.address(h)}  agent h{h} up (etcd mode), "
                  f"tap ovl0 {overlay_ip(h)}/24")
        print(f"\npings across the overlay (VNI {VNI}, every pair):")
        failed = 0
        for src in range(1, hosts + 1):
            for dst in range(1, hosts + 1):
                if src == dst:
                    continue
                out = lab.run(src, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", overlay_ip(dst)], check=False)
                rtt = re.search(r"= [\d.]+/([\d.]+)/", out.stdout)
                ok = out.returncode == 0
                failed += not ok
                print(f"  host {src} -> {overlay_ip(dst)}: {'ok, avg rtt ' + rtt.group(1) + ' ms' if ok and rtt else 'FAILED'}")
        print(f"\nhost 1: overlay host ls --etcd {etcd.endpoint}")
        print(lab.run(1, [*overlay, "host", "ls", "--etcd", etcd.endpoint]).stdout)
        print("the registry in etcd (etcdctl get --prefix /overlay/v1):")
        for line in etcdlab.etcdctl(etcd, "get", "--prefix", "/overlay/v1", check=True).stdout.splitlines():
            print(f"  {line}")
        print("\nhost 1: overlay status")
        print(lab.run(1, [*overlay, "status"]).stdout)
        print("host 1: overlay fdb")
        print(lab.run(1, [*overlay, "fdb"]).stdout)
        print(f"result: {'all pings answered' if not failed else f'{failed} pings FAILED'}; removing the lab")
        return 0 if not failed else 1
    except (LabError, TimeoutError, etcdlab.EtcdError) as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 1
    finally:
        lab.down()
        if etcd is not None:
            etcd.stop()
