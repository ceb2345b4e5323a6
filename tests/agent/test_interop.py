"""Wire interop with the Linux kernel's vxlan device, both directions: ping and TCP.

Host 3 runs a kernel vxlan device instead of an agent:
    ip link add vx0 type vxlan id 42 dstport 4789 local 198.18.0.3 nolearning
    bridge fdb append 00:00:00:00:00:00 dev vx0 dst <each agent's address>
Pitfall seen on this lab: over veth the kernel vxlan device leaves inner TCP/UDP checksums
unfinished (CHECKSUM_PARTIAL) for a NIC to fill in, so ping works and TCP does not connect.
`ethtool -K vx0 tx off` makes the kernel finish them in software, as a real NIC would. overlay
itself always sends finished checksums (its TAP has no offloads), which the kernel accepts.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Iterator

import pytest

from overlay.lab import Lab
from tests.labkit import VNI, new_lab, overlay_ip, start_agent, status, tcp_transfer, wait_ping

pytestmark = pytest.mark.root
KERNEL = 3


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    logs = tmp_path_factory.mktemp("logs")
    with new_lab(hosts=3, prefix="ti") as lab:
        for h in (1, 2):
            start_agent(lab, h, [p for p in (1, 2, 3) if p != h], log_dir=logs)
        k = lab.address(KERNEL)
        lab.run(
            KERNEL,
            [
                "ip",
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                str(VNI),
                "dstport",
                "4789",
                "local",
                str(k),
                "nolearning",
            ],
        )
        for h in (1, 2):
            lab.run(KERNEL, ["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", str(lab.address(h))])
        lab.run(KERNEL, ["ethtool", "-K", "vx0", "tx", "off"])
        lab.run(KERNEL, ["ip", "link", "set", "vx0", "address", "02:00:00:00:00:03", "mtu", "1450", "up"])
        lab.run(KERNEL, ["ip", "addr", "add", f"{overlay_ip(KERNEL)}/24", "dev", "vx0"])
        yield lab


@pytest.mark.parametrize(("src", "dst"), [(1, KERNEL), (KERNEL, 1), (2, KERNEL), (KERNEL, 2)])
def test_ping_between_agent_and_kernel_vxlan(mixed: Lab, src: int, dst: int) -> None:
    wait_ping(mixed, src, overlay_ip(dst))


def test_agent_learns_the_kernel_hosts_mac(mixed: Lab) -> None:
    wait_ping(mixed, 1, overlay_ip(KERNEL))
    fdb = status(mixed, 1, cmd="fdb")
    assert {"mac": "02:00:00:00:00:03", "vtep": f"{mixed.address(KERNEL)}:4789"}.items() <= next(
        e for e in fdb if e["mac"] == "02:00:00:00:00:03"
    ).items()


@pytest.mark.parametrize(("src", "dst"), [(1, KERNEL), (KERNEL, 1)])
def test_tcp_between_agent_and_kernel_vxlan(mixed: Lab, tmp_path: Path, src: int, dst: int) -> None:
    data = tmp_path / "payload"
    data.write_bytes(random.Random(src).randbytes(8 * 1024 * 1024))
    wait_ping(mixed, src, overlay_ip(dst))
    digest, count = tcp_transfer(mixed, src, dst, overlay_ip(dst), data)
    assert (digest, count) == (hashlib.sha256(data.read_bytes()).hexdigest(), 8 * 1024 * 1024)
