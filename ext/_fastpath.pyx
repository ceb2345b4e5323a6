# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""overlay's fast path: VXLAN encapsulation, decapsulation and forwarding lookups in batches.

The pipeline, one stage per function (io.pxi drives it; the agent only calls the pumps):

  TAP -> UDP   (pump_tx)
    read_tap        TAP reads until EAGAIN: virtio-net header + frame, up to 64 KiB each
    prepare_frame   offloads (offload.pxi = overlay/core/offload.py): finish a partial checksum,
                    or cut a TCP super-frame into segments; ordinary frames into a FrameBatch
    encap_batch     per frame: FDB lookup (VNI, dst MAC) -> VTEP, or the VNI's flood list for
                    group and unknown MACs; VXLAN header written in front of the frame (the
                    8 bytes of headroom); flow hash -> source port; one output per VTEP
    send_outputs    consecutive same-size outputs to one VTEP -> one UDP_SEGMENT message, from
                    the socket of the pool that the flow hash picks; sendmmsg

  UDP -> TAP   (pump_rx)
    recv_udp        recvmmsg; UDP_GRO may merge a flow's datagrams into one message
    split_datagrams one datagram per slot, at HEADROOM - 8, with its source address
    decap_batch     receive rules (codec.pxi = overlay/core/wire.py), VNI served, inner VLAN
                    policy, source check; learning: an unknown source MAC is queued for
                    overlay/core/fdb.py (take_learned), a known one marked seen (take_hits)
    write_tap       in order; runs of one TCP stream's segments coalesced into one super-frame
                    (offload.pxi = overlay/core/offload.coalesce), the rest written as they came

Files, assembled here by include like uvloop's: hashmap.pxi (the one hash table), codec.pxi
(header and flow hash, the C copy of overlay/core/wire.py), table.pxi (ForwardingCore: VNIs, VTEPs,
FDB and flood lists), syscalls.pxi (C declarations), batch.pxi (FrameBatch and the encap/decap
stages), offload.pxi (checksums, segmentation, coalescing), io.pxi (the pumps).
overlay/fastpath/_fastpath.pyi types the Python-level API.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset, memcmp

import time

cdef extern from "<stdlib.h>":
    void* aligned_alloc(size_t alignment, size_t size) nogil

cdef extern from "<sys/mman.h>":
    int madvise(void* addr, size_t length, int advice) nogil
    int MADV_HUGEPAGE

cdef extern from *:
    void __builtin_prefetch(const void* addr) noexcept nogil

include "hashmap.pxi"
include "codec.pxi"
include "crypto.pxi"
include "table.pxi"
include "syscalls.pxi"
include "batch.pxi"
include "offload.pxi"
include "io.pxi"

HEADROOM_BYTES = HEADROOM
TAILROOM_BYTES = TAILROOM
DROP_REASONS = {
    "TOO_SHORT": DROP_TOO_SHORT,
    "NO_I_FLAG": DROP_NO_I_FLAG,
    "INNER_TOO_SHORT": DROP_INNER_TOO_SHORT,
    "UNKNOWN_VNI": DROP_UNKNOWN_VNI,
    "INNER_VLAN": DROP_INNER_VLAN,
    "NO_PEERS": DROP_NO_PEERS,
    "OUT_OF_ROOM": DROP_OUT_OF_ROOM,
    "NOT_MEMBER": DROP_NOT_MEMBER,
    "TOO_BIG": DROP_TOO_BIG,
    "TX_ERROR": DROP_TX_ERROR,
    "TAP_WRITE": DROP_TAP_WRITE,
    "OVERSIZE": DROP_OVERSIZE,
    "BAD_OFFLOAD": DROP_BAD_OFFLOAD,
    "ROUTER_ADVERT": DROP_ROUTER_ADVERT,
    "AUTH_FAILED": DROP_AUTH_FAILED,
    "REPLAYED": DROP_REPLAYED,
    "NOT_ENCRYPTED": DROP_NOT_ENCRYPTED,
    "NO_SESSION": DROP_NO_SESSION,
    "HANDSHAKE_LIMITED": DROP_HANDSHAKE_LIMITED,
}
SEAL_OVERHEAD_BYTES = SEAL_OVERHEAD


def use_openssl_provider(bint on):
    """Call OpenSSL's default provider directly (True, the default) or go through EVP (False)
    for sessions keyed from now on: for the tests that hold the two paths equal."""
    global USE_PROVIDER
    USE_PROVIDER = on


def openssl_provider_in_use():
    """Whether sessions are sealed through the provider's functions directly (else EVP)."""
    if not IMPLS_LOOKED_UP:
        look_up_impls()
    return USE_PROVIDER and impl_complete(&IMPLS[CIPHER_AES_256_GCM]) and impl_complete(&IMPLS[CIPHER_CHACHA20_POLY1305])
VNET_HDR_BYTES = VNET_HLEN


def encap(ForwardingCore core, FrameBatch batch, uint32_t vni, Py_ssize_t start=0, Py_ssize_t stop=-1):
    """Encapsulate frames start..stop-1 (stop=-1: all slots); return the next slot to do.
    The datagrams to send are ``batch.outputs()`` (or, in C, the out_* arrays)."""
    if stop < 0:
        stop = batch.slots
    if not 0 <= start <= stop <= batch.slots:
        raise IndexError(f"bad slot range {start}..{stop} for {batch.slots} slots")
    cdef Py_ssize_t nxt
    with nogil:
        nxt = encap_batch(core, batch, vni, start, stop)
    return nxt


def decap(ForwardingCore core, FrameBatch batch, Py_ssize_t n=-1):
    """Decapsulate the first n datagrams (n=-1: all slots); return how many passed."""
    if n < 0:
        n = batch.slots
    if n > batch.slots:
        raise IndexError(f"{n} datagrams for {batch.slots} slots")
    cdef Py_ssize_t passed
    with nogil:
        passed = decap_batch(core, batch, n)
    return passed


def flow_source_port(const uint8_t[:] frame):
    """wire.source_port, in C: for the differential tests."""
    if frame.shape[0] < ETH_HLEN:
        raise ValueError("a frame has at least 14 bytes")
    return source_port(&frame[0], frame.shape[0])


def pump_tx(ForwardingCore core, FrameBatch reads, FrameBatch frames, uint32_t vni, int tap_fd,
            send_fds, Py_ssize_t budget=256, send_fds6=()):
    """TAP -> offloads -> encap -> sendmmsg, until the TAP is drained or ``budget`` frames were
    read; return the number of TAP reads. ``reads`` holds what the TAP gives (virtio-net header
    + frame, up to 64 KiB), ``frames`` the ordinary frames made from it; ``send_fds`` are the
    UDP sockets (IPv4) to send from to IPv4 VTEPs and ``send_fds6`` (IPv6) to IPv6 VTEPs (0 to
    64 each; a flow always uses the same one). Drops are counted in ``core``; a TAP error
    leaves its errno in ``reads.io_error``."""
    cdef Senders fds
    cdef Py_ssize_t n
    senders_from(send_fds, send_fds6, &fds)
    with nogil:
        n = pump_tap_to_udp(core, reads, frames, vni, tap_fd, &fds, budget)
    return n


def prepare(FrameBatch reads, Py_ssize_t i, FrameBatch frames, Py_ssize_t used=0):
    """prepare_frame on slot i of ``reads`` (virtio-net header + frame, as put_frame placed
    them) into ``frames`` from slot ``used``: (status, slots used after). For the tests."""
    cdef Py_ssize_t u = used
    reads.check_slot(i)
    st = prepare_frame(reads.frame_ptr(i), reads.length[i], frames, &u)
    return st, u


def pump_rx(ForwardingCore core, FrameBatch msgs, FrameBatch frames, FrameBatch merge, int udp_fd,
            int tap_fd, Py_ssize_t budget=256):
    """recvmmsg -> decap -> TAP writes, until the socket is drained or ``budget`` datagrams
    were handled; return how many. ``msgs`` receives (slots of 64 KiB: UDP_GRO merges
    datagrams), ``frames`` holds one datagram per slot, ``merge`` (one 64 KiB slot) builds TCP
    super-frames. Learned sources wait in ``core.take_learned()``; a socket error leaves its
    errno in ``msgs.io_error``."""
    cdef Py_ssize_t n
    if merge.max_frame_c < MAX_SUPER:
        raise ValueError("merge needs a slot for a 64 KiB frame")
    with nogil:
        n = pump_udp_to_tap(core, msgs, frames, merge, udp_fd, tap_fd, budget)
    return n
