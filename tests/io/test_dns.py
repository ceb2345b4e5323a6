"""io.dns: the responder on real sockets in namespaces of its own, on asyncio and on uvloop.

One lab host (the "host") holds the gateway end of a veth, gw42 = 198.19.42.1/24 and
2001:2:0:42::1/64, and on its lo fake upstream resolvers (no dummy module needed) (198.18.53.53 answers, .54 and
.56 never answer, .55 sends spoofed replies); a container namespace holds the other end, eth0 =
198.19.42.100/24, 2001:2:0:42::100/64 and 198.19.43.100/24 (an address of another network).
The test's event loop runs inside the host (its sockets are made there); client sockets are
made inside the container and used from threads (blocking, with timeouts)."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Awaitable, Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import uvloop

from overlay.core.dns import Names
from overlay.core.registry import Endpoint, EndpointKey, Network, NetworkKey, Put
from overlay.io.dns import DnsError, DnsServer
from overlay.lab import Lab, wait_for
from tests.labkit import new_lab

pytestmark = pytest.mark.root

VNI = 42
GW, GW6 = ipaddress.ip_address("198.19.42.1"), ipaddress.ip_address("2001:2:0:42::1")
ME, ME6, FOREIGN = "198.19.42.100", "2001:2:0:42::100", "198.19.43.100"
UPSTREAM, MUTE, SPOOFER, MUTE2 = (ipaddress.ip_address(f"198.18.53.{n}") for n in (53, 54, 55, 56))
OUTSIDE = "198.18.99.1"  # what the fake upstream answers for every name

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in network namespace ``ns`` for the block (sockets made there stay there)."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                os._exit(70)  # never go on in the wrong namespace
    finally:
        os.close(fd)
        os.close(home)


class World:
    def __init__(self, lab: Lab, container: str) -> None:
        self.lab, self.host, self.container = lab, lab.ns(1), container


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with new_lab(hosts=1, prefix="dns", dual_stack=True) as lab:
        c = lab.add_container("c1")
        lab.run(c, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.accept_ra=0"])
        h = 1
        for cmd in (
            ["ip", "link", "add", "gw42", "type", "veth", "peer", "name", "eth0", "netns", c],
            ["ip", "addr", "add", "198.19.42.1/24", "dev", "gw42"],
            ["ip", "addr", "add", "2001:2:0:42::1/64", "dev", "gw42", "nodad"],
            ["ip", "link", "set", "gw42", "up"],
            *(["ip", "addr", "add", f"{a}/32", "dev", "lo"] for a in (UPSTREAM, MUTE, SPOOFER, MUTE2)),
        ):
            lab.run(h, cmd)
        for cmd in (
            ["ip", "addr", "add", f"{ME}/24", "dev", "eth0"],
            ["ip", "addr", "add", f"{FOREIGN}/24", "dev", "eth0"],
            ["ip", "addr", "add", f"{ME6}/64", "dev", "eth0", "nodad"],
            ["ip", "link", "set", "eth0", "up"],
        ):
            lab.run(c, cmd)
        for ns in (lab.ns(h), c):
            wait_for(
                lambda ns=ns: not lab.run(ns, ["ip", "-6", "addr", "show", "tentative"]).stdout.strip(),
                10,
                f"IPv6 addresses in {ns} to leave the tentative state",
            )
        yield World(lab, c)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest, world: World) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine on the loop of the parameter, inside the host namespace, bounded."""

    async def bounded(coro: Awaitable[Any]) -> Any:
        async with asyncio.timeout(60):
            return await coro

    def runner(coro: Awaitable[Any]) -> Any:
        with inside(world.host):
            if request.param == "uvloop":
                return uvloop.run(bounded(coro))
            return asyncio.run(bounded(coro))

    return runner


def names(web: str = "198.19.42.5") -> Names:
    n = Names()
    n.apply(
        [
            Put(NetworkKey(VNI), Network(VNI, "blue", "198.19.42.0/24", gateway=str(GW), subnet6="2001:2:0:42::/64")),
            Put(EndpointKey(VNI, 1), Endpoint("h1", [web], ["2001:2:0:42::5"], "web", ["80/tcp"])),
        ]
    )
    return n


# --- clients inside the container, fake upstreams inside the host ---------------------------


def client(world: World, kind: int, source: str) -> socket.socket:
    with inside(world.container):
        sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, kind)
    sock.bind((source, 0))
    sock.settimeout(5)
    return sock


async def ask(
    world: World, qname: str, rdtype: str = "A", *, tcp: bool = False, source: str = ME, to: Any = GW
) -> dns.message.Message:
    wire = dns.message.make_query(qname, rdtype).to_wire()

    def blocking() -> bytes:
        with client(world, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM, source) as s:
            if tcp:
                s.connect((str(to), 53))
                s.sendall(len(wire).to_bytes(2, "big") + wire)
                n = int.from_bytes(recv_exactly(s, 2), "big")
                return recv_exactly(s, n)
            s.sendto(wire, (str(to), 53))
            return s.recvfrom(65535)[0]

    return dns.message.from_wire(await asyncio.to_thread(blocking))


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def addresses(m: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in m.answer for rd in rrset}


class Upstream(asyncio.DatagramProtocol):
    """A fake resolver: answers every A query with OUTSIDE ("answer"), never ("mute"), or
    first with a spoofed reply from another address and one with another id ("spoof")."""

    def __init__(self, mode: str, spoofer: asyncio.DatagramTransport | None = None) -> None:
        self.mode, self.spoofer = mode, spoofer
        self.seen: list[str] = []  # "udp" / "tcp" per query
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @staticmethod
    def reply(wire: bytes, address: str = OUTSIDE, id_offset: int = 0) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        r.id = (r.id + id_offset) % 65536
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", address))
        return r.to_wire()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append("udp")
        assert self.transport is not None
        if self.mode == "answer":
            self.transport.sendto(self.reply(data), addr)
        elif self.mode == "spoof":
            assert self.spoofer is not None
            self.spoofer.sendto(self.reply(data, "198.18.66.66"), addr)  # right id, wrong source
            self.transport.sendto(self.reply(data, "198.18.66.67", id_offset=1), addr)  # wrong id
            asyncio.get_running_loop().call_later(0.05, self.transport.sendto, self.reply(data), addr)

    async def tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            n = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(n)
            self.seen.append("tcp")
            if self.mode == "answer":
                r = self.reply(data)
                writer.write(len(r).to_bytes(2, "big") + r)
                await writer.drain()
            else:
                await asyncio.sleep(30)
        finally:
            writer.close()


@contextmanager
def closing(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for t in things:
            t.close()


async def upstream(address: Any, mode: str = "answer") -> tuple[Upstream, list[Any]]:
    loop = asyncio.get_running_loop()
    spoofer = None
    opened: list[Any] = []
    if mode == "spoof":
        spoofer, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(str(SPOOFER), 53))
        opened.append(spoofer)
    proto = Upstream(mode, spoofer)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(str(address), 53))
    server = await asyncio.start_server(proto.tcp, str(address), 53)
    return proto, [*opened, transport, server]


# --- the tests -------------------------------------------------------------------------------


def test_names_are_answered_over_udp_and_tcp_on_ipv4_and_ipv6(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        try:
            await server.serve(VNI, GW, device="gw42")
            await server.serve(VNI, GW6, device="gw42")
            for tcp in (False, True):
                m = await ask(world, "web", tcp=tcp)
                assert addresses(m) == {"198.19.42.5"} and m.flags & dns.flags.AA and m.answer[0].ttl == 5
                m = await ask(world, "web.blue", "AAAA", tcp=tcp, source=ME6, to=GW6)
                assert addresses(m) == {"2001:2:0:42::5"}
            m = await ask(world, "5.42.19.198.in-addr.arpa", "PTR")
            assert addresses(m) == {"web.blue."}
            s = server.status()
            assert s["queries"] == 5 and s["answered"] == 5 and s["tcp_connections"] == 2 and s["listening"] == 2
        finally:
            await server.close()

    run(main())


def test_srv_gives_a_services_port_with_the_targets_addresses_over_udp(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        try:
            await server.serve(VNI, GW, device="gw42")
            m = await ask(world, "_http._tcp.web", "SRV")
            assert m.rcode() == dns.rcode.NOERROR and m.flags & dns.flags.AA
            assert addresses(m) == {"0 0 80 web.blue."} and m.answer[0].ttl == 5
            assert {(r.name.to_text(), rd.to_text()) for r in m.additional for rd in r} == {
                ("web.blue.", "198.19.42.5"),
                ("web.blue.", "2001:2:0:42::5"),
            }
            m = await ask(world, "_8080._tcp.web.blue", "SRV")  # a port web does not expose
            assert m.rcode() == dns.rcode.NXDOMAIN
            s = server.status()
            assert s["queries"] == 2 and s["answered"] == 1 and s["nxdomain"] == 1
        finally:
            await server.close()

    run(main())


def test_unknown_names_are_nxdomain_and_a_moved_name_is_answered_with_its_new_address(world: World, run: Any) -> None:
    async def main() -> None:
        n = names()
        server = DnsServer(n, [])
        try:
            await server.serve(VNI, GW)
            m = await ask(world, "nope.blue")
            assert m.rcode() == dns.rcode.NXDOMAIN and server.status()["nxdomain"] == 1
            assert addresses(await ask(world, "web")) == {"198.19.42.5"}
            n.apply([Put(EndpointKey(VNI, 1), Endpoint("h2", ["198.19.42.55"], [], "web"))])
            assert addresses(await ask(world, "web")) == {"198.19.42.55"}
            assert addresses(await ask(world, "web", tcp=True)) == {"198.19.42.55"}
        finally:
            await server.close()

    run(main())


def test_other_names_are_forwarded_to_the_upstream_udp_as_udp_and_tcp_as_tcp(world: World, run: Any) -> None:
    async def main() -> None:
        up, opened = await upstream(UPSTREAM)
        server = DnsServer(names(), [UPSTREAM])
        with closing(*opened):
            try:
                await server.serve(VNI, GW)
                m = await ask(world, "example.com")
                assert m.rcode() == dns.rcode.NOERROR and addresses(m) == {OUTSIDE}
                m = await ask(world, "Example.ORG", tcp=True)
                assert addresses(m) == {OUTSIDE} and m.question[0].name.to_text() == "Example.ORG."
                assert up.seen == ["udp", "tcp"]
                s = server.status()
                assert s["forwarded"] == 2 and s["forward_answered"] == 2 and s["inflight"] == 0
            finally:
                await server.close()

    run(main())


def test_without_upstreams_other_names_are_refused(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        try:
            await server.serve(VNI, GW)
            for tcp in (False, True):
                m = await ask(world, "example.com", tcp=tcp)
                assert m.rcode() == dns.rcode.REFUSED
            assert server.status()["refused"] == 2 and server.status()["forwarded"] == 0
        finally:
            await server.close()

    run(main())


def test_upstreams_that_do_not_answer_give_servfail_within_the_timeouts(world: World, run: Any) -> None:
    async def main() -> None:
        _, opened = await upstream(MUTE, "mute")
        _, opened2 = await upstream(MUTE2, "mute")
        up, opened3 = await upstream(UPSTREAM)
        with closing(*opened, *opened2, *opened3):
            server = DnsServer(names(), [MUTE, MUTE2], timeout=0.3)
            try:
                await server.serve(VNI, GW)
                for tcp in (False, True):
                    t0 = time.monotonic()
                    m = await ask(world, "example.com", tcp=tcp)
                    took = time.monotonic() - t0
                    assert m.rcode() == dns.rcode.SERVFAIL and 0.55 < took < 2.0, (tcp, took)
                s = server.status()
                assert s["forward_timeouts"] == 4 and s["servfail"] == 2
                server.set_upstreams([MUTE, UPSTREAM])  # the next one answers
                t0 = time.monotonic()
                assert addresses(await ask(world, "example.com")) == {OUTSIDE}
                assert 0.25 < time.monotonic() - t0 < 1.5 and up.seen == ["udp"]
            finally:
                await server.close()

    run(main())


def test_upstream_replies_from_other_addresses_or_with_another_id_are_ignored(world: World, run: Any) -> None:
    async def main() -> None:
        _, opened = await upstream(UPSTREAM, "spoof")
        server = DnsServer(names(), [UPSTREAM])
        with closing(*opened):
            try:
                await server.serve(VNI, GW)
                assert addresses(await ask(world, "example.com")) == {OUTSIDE}
                await asyncio.sleep(0.1)
                assert server.status()["forward_mismatched"] == 1  # the wrong id; the spoofer's never got in
            finally:
                await server.close()

    run(main())


def test_queries_from_another_networks_address_are_not_answered(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        try:
            await server.serve(VNI, GW)
            with pytest.raises((TimeoutError, socket.timeout)):
                wire = dns.message.make_query("web", "A").to_wire()

                def blocking() -> None:
                    with client(world, socket.SOCK_DGRAM, FOREIGN) as s:
                        s.settimeout(0.5)
                        s.sendto(wire, (str(GW), 53))
                        s.recvfrom(512)

                await asyncio.to_thread(blocking)
            assert server.status()["dropped_foreign_source"] == 1
        finally:
            await server.close()

    run(main())


def test_unserve_closes_the_port(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        try:
            await server.serve(VNI, GW)
            assert addresses(await ask(world, "web")) == {"198.19.42.5"}
            await server.unserve(VNI)
            with pytest.raises(ConnectionRefusedError):
                await ask(world, "web", tcp=True)

            def udp_refused() -> None:
                with client(world, socket.SOCK_DGRAM, ME) as s:
                    s.connect((str(GW), 53))
                    s.send(dns.message.make_query("web", "A").to_wire())
                    s.recv(512)  # the ICMP port unreachable comes back as an error

            with pytest.raises(ConnectionRefusedError):
                await asyncio.to_thread(udp_refused)
            assert server.status()["listening"] == 0
        finally:
            await server.close()

    run(main())


def test_a_taken_port_is_a_one_line_error_naming_the_fix(world: World, run: Any) -> None:
    async def main() -> None:
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind((str(GW), 53))
        server = DnsServer(names(), [])
        try:
            with pytest.raises(DnsError) as e:
                await server.serve(VNI, GW)
            assert "198.19.42.1 is taken (a dnsmasq or systemd-resolved?)" in str(e.value)
            assert "\n" not in str(e.value) and server.status()["listening"] == 0
        finally:
            squatter.close()
            await server.close()
        server = DnsServer(names(), [])
        with pytest.raises(DnsError, match="no such device"):
            await server.serve(VNI, GW, device="nosuchdev0")

    run(main())


def test_an_address_that_appears_later_is_served_once_it_is_there(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [])
        late = ipaddress.ip_address("198.19.42.2")
        try:
            await server.serve(VNI, late)  # not an address of the host yet: IP_FREEBIND
            await asyncio.to_thread(world.lab.run, 1, ["ip", "addr", "add", "198.19.42.2/24", "dev", "gw42"])
            assert addresses(await ask(world, "web", to=late)) == {"198.19.42.5"}
        finally:
            await server.close()
            await asyncio.to_thread(world.lab.run, 1, ["ip", "addr", "del", "198.19.42.2/24", "dev", "gw42"])

    run(main())


def test_tcp_frames_cut_short_idle_connections_and_too_many_connections_are_closed(world: World, run: Any) -> None:
    async def main() -> None:
        server = DnsServer(names(), [], max_tcp=2, tcp_idle=0.3)
        try:
            await server.serve(VNI, GW)

            def scenario() -> None:
                with client(world, socket.SOCK_STREAM, ME) as a, client(world, socket.SOCK_STREAM, ME) as b:
                    a.connect((str(GW), 53))
                    b.connect((str(GW), 53))
                    wait_for(lambda: server.status()["tcp_open"] == 2, 5, "two connections")
                    with client(world, socket.SOCK_STREAM, ME) as c:  # a third: closed at once
                        c.connect((str(GW), 53))
                        assert c.recv(10) == b""
                    a.sendall(b"\x00\x40abc")  # a frame of 64 bytes that stops after 3
                    a.shutdown(socket.SHUT_WR)
                    assert a.recv(10) == b""
                    t0 = time.monotonic()
                    assert b.recv(10) == b""  # idle: closed after 0.3 s
                    assert time.monotonic() - t0 < 2

            await asyncio.to_thread(scenario)
            s = server.status()
            assert s["tcp_refused"] == 1 and s["dropped_tcp_short"] == 1 and s["tcp_idle_closed"] == 1
            assert s["tcp_open"] == 0
        finally:
            await server.close()

    run(main())


def test_queries_over_the_in_flight_bound_are_refused(world: World, run: Any) -> None:
    async def main() -> None:
        _, opened = await upstream(MUTE, "mute")
        server = DnsServer(names(), [MUTE], timeout=1.0, max_inflight=1)
        with closing(*opened):
            try:
                await server.serve(VNI, GW)
                first = asyncio.create_task(ask(world, "slow.example"))
                await asyncio.sleep(0.2)
                m = await ask(world, "other.example")
                assert m.rcode() == dns.rcode.REFUSED and server.status()["refused_overload"] == 1
                assert (await first).rcode() == dns.rcode.SERVFAIL
            finally:
                await server.close()

    run(main())


def test_one_network_cannot_take_more_than_its_share_of_queries_in_flight(world: World, run: Any) -> None:
    async def main() -> None:
        _, opened = await upstream(MUTE, "mute")
        server = DnsServer(names(), [MUTE], timeout=1.0, max_inflight=8, per_network_inflight=1)
        with closing(*opened):
            try:
                await server.serve(VNI, GW)
                first = asyncio.create_task(ask(world, "slow.example"))
                await asyncio.sleep(0.2)
                m = await ask(world, "other.example")  # the host's total has room: this network has none
                assert m.rcode() == dns.rcode.REFUSED and server.status()["refused_overload"] == 1
                assert server.status()["inflight"] == 1
                assert (await first).rcode() == dns.rcode.SERVFAIL
            finally:
                await server.close()

    run(main())
