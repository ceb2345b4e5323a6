"""overlay/io/ports.py: holding published host ports. Binds only (nothing listens, nothing is
sent), on loopback or the wildcard of the namespace the tests run in, on ports the kernel
picked free."""

from __future__ import annotations

import errno
import socket
from dataclasses import replace
from ipaddress import ip_address

import pytest

from overlay.core.ports import PortSpec, parse
from overlay.io import ports


def ephemeral_range() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    return range(low, high + 1)


def test_a_port_in_use_by_another_program_is_refused_in_one_line():
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        port = other.getsockname()[1]
        with pytest.raises(ports.PortError) as e:
            ports.reserve(PortSpec("tcp", port, 80), socket.AF_INET)
    assert str(e.value) == (
        f"port {port}/tcp is already in use on this host (by another program or publication): choose another "
        "host port, or leave it out for a random free one"
    )


def test_a_reserved_port_is_taken_for_every_other_program():
    sock, port = ports.reserve_random(parse("127.0.0.1::80"), socket.AF_INET)
    with sock, socket.socket() as other:
        with pytest.raises(OSError) as e:
            other.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
    with socket.socket() as again:  # closing the reservation gives the port back
        again.bind(("127.0.0.1", port))


def test_a_random_reservation_is_a_high_port_that_is_then_taken():
    spec = parse("80/udp")
    sock, port = ports.reserve_random(spec, socket.AF_INET)
    with sock:
        assert port in ephemeral_range()
        assert sock.type == socket.SOCK_DGRAM and sock.getsockname() == ("0.0.0.0", port)
        with pytest.raises(ports.PortError, match=f"port {port}/udp is already in use on this host"):
            ports.reserve(replace(spec, host_port=port), socket.AF_INET)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, pytest.raises(OSError):
            other.bind(("0.0.0.0", port))


def test_a_reservation_neither_listens_nor_survives_exec_nor_shares_its_port():
    sock, port = ports.reserve_random(parse("127.0.0.1::80"), socket.AF_INET)
    with sock:
        assert not sock.get_inheritable()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        with socket.socket() as client:  # nothing accepts on it
            assert client.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def test_reserve_binds_the_host_ip_and_the_protocol_asked_for():
    probe, port = ports.reserve_random(parse("127.0.0.1::80"), socket.AF_INET)
    probe.close()
    with ports.reserve(parse(f"127.0.0.1:{port}:80"), socket.AF_INET) as sock:
        assert sock.type == socket.SOCK_STREAM and sock.getsockname() == ("127.0.0.1", port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # udp is another port space
            udp.bind(("127.0.0.1", port))


def test_a_foreign_host_ip_is_refused_in_one_line():
    with pytest.raises(ports.PortError) as e:
        ports.reserve(parse("198.18.9.9:8080:80"), socket.AF_INET)
    assert str(e.value) == "198.18.9.9 is not an address of this host: give one of its addresses, or none for all"
    with pytest.raises(ports.PortError, match="198.18.9.9 is not an address of this host"):
        ports.reserve_random(parse("198.18.9.9::80"), socket.AF_INET)


def test_a_host_ip_of_the_other_family_than_the_container_is_refused():
    with pytest.raises(ports.PortError, match=r"^::1 is an IPv6 address and the container's is IPv4: publish on"):
        ports.reserve(PortSpec("tcp", 8080, 80, ip_address("::1")), socket.AF_INET)


def test_an_ipv6_container_reserves_on_ipv6_only():
    if not socket.has_ipv6 or not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    sock, port = ports.reserve_random(parse("80"), socket.AF_INET6)
    with sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[:2] == ("::", port)
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    with ports.reserve(PortSpec("tcp", port, 80, ip_address("::1")), 6) as sock:  # 4 and 6 do as families
        assert sock.getsockname()[:2] == ("::1", port)


def test_a_family_that_is_not_ip_is_a_programming_error():
    with pytest.raises(ValueError, match="family"):
        ports.reserve(parse("8080:80"), socket.AF_UNIX)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True
