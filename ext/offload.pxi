# ---- offload.pxi: checksum completion and TCP segmentation, as in overlay/core/offload.py ----
#
# Read beside overlay/core/offload.py (the reference and its rules). A TAP with IFF_VNET_HDR gives
# each frame a 10-byte virtio-net header; ``prepare_frame`` turns one such frame into ordinary
# frames with finished checksums in a FrameBatch: copied as is, checksum completed, or cut into
# TCP segments.

cdef enum:
    VNET_HLEN = 10
    F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_ECN = 0x80


cdef struct VnetHdr:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset


cdef inline VnetHdr read_vnet(const uint8_t* p) noexcept nogil:
    """The header is little-endian (x86 native, and TUNSETVNETLE on big-endian hosts)."""
    cdef VnetHdr h
    h.flags = p[0]
    h.gso_type = p[1]
    h.hdr_len = p[2] | (p[3] << 8)
    h.gso_size = p[4] | (p[5] << 8)
    h.csum_start = p[6] | (p[7] << 8)
    h.csum_offset = p[8] | (p[9] << 8)
    return h


cdef inline uint64_t ones_add(const uint8_t* p, Py_ssize_t n, uint64_t acc) noexcept nogil:
    """acc + offload.ones_sum(p[:n]) (not yet folded). Sums native 32-bit words eight bytes at
    a time, then converts: a one's complement sum is the same in either byte order up to a
    final swap (RFC 1071), which ntohs does."""
    cdef uint64_t native = 0, w
    cdef uint16_t w16 = 0
    while n >= 8:
        memcpy(&w, p, 8)
        native += (w & 0xFFFFFFFFu) + (w >> 32)
        p += 8
        n -= 8
    while n >= 2:
        memcpy(&w16, p, 2)
        native += w16
        p += 2
        n -= 2
    if n:
        w16 = 0
        (<uint8_t*>&w16)[0] = p[0]     # a last odd byte is the high byte of a big-endian word
        native += w16
    return acc + ntohs(fold(native))


cdef inline uint16_t fold(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint16_t>acc


cdef inline void put16(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline Py_ssize_t ip_offset(const uint8_t* f, Py_ssize_t n, uint32_t* ethertype) noexcept nogil:
    """offload._l3: offset of the IP header, skipping one VLAN tag."""
    ethertype[0] = be16(f + 12)
    if (ethertype[0] == 0x8100 or ethertype[0] == 0x88A8) and n >= 18:
        ethertype[0] = be16(f + 16)
        return 18
    return 14


cdef int finish_checksum(uint8_t* f, Py_ssize_t n, const VnetHdr* h) noexcept nogil:
    """offload.finish_checksum, in place; DROP_BAD_OFFLOAD if the offsets do not fit."""
    cdef Py_ssize_t where = <Py_ssize_t>h.csum_start + h.csum_offset
    cdef uint16_t value
    if h.csum_start < ETH_HLEN or where + 2 > n:
        return DROP_BAD_OFFLOAD
    value = ~fold(ones_add(f + h.csum_start, n - h.csum_start, 0)) & 0xFFFF
    put16(f + where, value if value != 0 else 0xFFFF)
    return OK


cdef int segment_tcp(const uint8_t* f, Py_ssize_t n, const VnetHdr* h, FrameBatch out,
                     Py_ssize_t* used) noexcept nogil:
    """offload.segment: TCP segments of super-frame ``f`` into ``out`` slots used[0].. ."""
    cdef uint32_t ethertype
    cdef Py_ssize_t l3 = ip_offset(f, n, &ethertype), l4 = h.csum_start, end, k, count, plen
    cdef Py_ssize_t payload, ihl
    cdef uint8_t kind = h.gso_type & ~GSO_ECN
    cdef uint8_t* s
    cdef uint8_t flags
    cdef uint32_t seq, seq_k, ip_id
    cdef uint64_t acc
    if h.gso_size == 0 or (kind == GSO_TCPV4) != (ethertype == 0x0800) \
            or (kind == GSO_TCPV6) != (ethertype == 0x86DD):
        return DROP_BAD_OFFLOAD
    if l4 < l3 + (20 if kind == GSO_TCPV4 else 40) or l4 + 20 > n:
        return DROP_BAD_OFFLOAD
    end = l4 + (f[l4 + 12] >> 4) * 4
    if end < l4 + 20 or end > n:
        return DROP_BAD_OFFLOAD
    payload = n - end
    count = (payload + h.gso_size - 1) // h.gso_size if payload > 0 else 1
    if used[0] + count > out.slots or end + h.gso_size > out.max_frame_c:
        return DROP_OUT_OF_ROOM
    seq = be32(f + l4 + 4)
    ip_id = be16(f + l3 + 4)
    flags = f[l4 + 13]
    for k in range(count):
        plen = min(<Py_ssize_t>h.gso_size, payload - k * h.gso_size) if payload > 0 else 0
        s = out.frame_ptr(used[0])
        memcpy(s, f, end)
        memcpy(s + end, f + end + k * h.gso_size, plen)
        out.length[used[0]] = <uint32_t>(end + plen)
        if kind == GSO_TCPV4:
            ihl = (s[l3] & 0x0F) * 4
            put16(s + l3 + 2, end - l3 + plen)
            put16(s + l3 + 4, (ip_id + k) & 0xFFFF)
            put16(s + l3 + 10, 0)
            put16(s + l3 + 10, ~fold(ones_add(s + l3, ihl, 0)) & 0xFFFF)
            acc = ones_add(s + l3 + 12, 8, 6 + (end - l4 + plen))
        else:
            put16(s + l3 + 4, end - l3 - 40 + plen)
            acc = ones_add(s + l3 + 8, 32, 6 + (end - l4 + plen))
        seq_k = seq + <uint32_t>(k * h.gso_size)
        s[l4 + 4] = (seq_k >> 24) & 0xFF
        s[l4 + 5] = (seq_k >> 16) & 0xFF
        s[l4 + 6] = (seq_k >> 8) & 0xFF
        s[l4 + 7] = seq_k & 0xFF
        s[l4 + 13] = flags
        if k != count - 1:
            s[l4 + 13] &= ~(0x01 | 0x08)      # FIN, PSH: last segment only
        if k != 0:
            s[l4 + 13] &= ~0x80               # CWR: first segment only
        put16(s + l4 + 16, 0)
        put16(s + l4 + 16, ~fold(ones_add(s + l4, end - l4 + plen, acc)) & 0xFFFF)
        used[0] += 1
    return OK


cdef int prepare_frame(uint8_t* v, Py_ssize_t n, FrameBatch out, Py_ssize_t* used) noexcept nogil:
    """One TAP read (``n`` bytes at ``v``: virtio-net header + frame) -> ordinary frames in
    ``out`` from slot used[0]; advances used[0]. Returns OK or a drop reason."""
    cdef VnetHdr h
    cdef uint8_t* f = v + VNET_HLEN
    cdef uint8_t* s
    cdef int st
    if n < VNET_HLEN + ETH_HLEN:
        return DROP_INNER_TOO_SHORT
    h = read_vnet(v)
    n -= VNET_HLEN
    if h.gso_type != GSO_NONE:
        return segment_tcp(f, n, &h, out, used)
    if used[0] >= out.slots or n > out.max_frame_c:
        return DROP_OUT_OF_ROOM
    s = out.frame_ptr(used[0])
    memcpy(s, f, n)
    if h.flags & F_NEEDS_CSUM:
        st = finish_checksum(s, n, &h)
        if st != OK:
            return st
    out.length[used[0]] = <uint32_t>n
    used[0] += 1
    return OK


# ---- receive: coalescing TCP segments into super-frames (overlay/core/offload.py: coalesce) ----

cdef enum:
    MAX_RUN = 64
    MAX_SUPER = 65535


cdef struct Seg:
    bint v6
    Py_ssize_t l4, end, payload
    uint32_t seq
    uint8_t flags


cdef bint tcp_segment(const uint8_t* f, Py_ssize_t n, Seg* s) noexcept nogil:
    """offload._tcp_segment: is ``f`` a coalescable TCP segment? Fills ``s`` if so."""
    cdef uint32_t ethertype = be16(f + 12)
    cdef uint64_t acc
    if ethertype == 0x0800 and n >= 34:
        if (f[14] >> 4) != 4 or (f[14] & 0x0F) != 5 or f[23] != 6 or be16(f + 16) != n - 14:
            return False
        if be16(f + 20) & 0x3FFF:
            return False
        s.l4 = 34
        s.v6 = False
        acc = ones_add(f + 26, 8, 6 + (n - 34))
    elif ethertype == 0x86DD and n >= 54:
        if (f[14] >> 4) != 6 or f[20] != 6 or be16(f + 18) != n - 54:
            return False
        s.l4 = 54
        s.v6 = True
        acc = ones_add(f + 22, 32, 6 + (n - 54))
    else:
        return False
    if n < s.l4 + 20:
        return False
    s.end = s.l4 + (f[s.l4 + 12] >> 4) * 4
    s.flags = f[s.l4 + 13]
    if s.end < s.l4 + 20 or s.end >= n or (s.flags & ~(0x10 | 0x08)) or not (s.flags & 0x10):
        return False
    if fold(ones_add(f + s.l4, n - s.l4, acc)) != 0xFFFF:
        return False
    s.seq = be32(f + s.l4 + 4)
    s.payload = n - s.end
    return True


cdef bint joins(const uint8_t* first, const Seg* h, const Seg* last, Py_ssize_t total,
                Py_ssize_t count, const uint8_t* f, const Seg* s) noexcept nogil:
    """offload._joins: may segment ``f`` extend the run that starts with ``first``?"""
    cdef Py_ssize_t l4 = h.l4
    if s.v6 != h.v6 or s.end != h.end or count >= MAX_RUN or total + s.payload > MAX_SUPER - (h.end - 14):
        return False
    if (last.flags & 0x08) or last.payload != h.payload or s.payload > h.payload:
        return False
    if s.seq != last.seq + <uint32_t>last.payload:
        return False
    if memcmp(f, first, 14) != 0:
        return False
    if h.v6:
        if memcmp(f + 14, first + 14, 4) != 0 or memcmp(f + 21, first + 21, 33) != 0:
            return False
    else:
        if f[15] != first[15] or (f[20] & 0x40) != (first[20] & 0x40) or memcmp(f + 22, first + 22, 2) != 0 \
                or memcmp(f + 26, first + 26, 8) != 0:
            return False
    return (memcmp(f + l4, first + l4, 4) == 0 and memcmp(f + l4 + 8, first + l4 + 8, 5) == 0
            and memcmp(f + l4 + 14, first + l4 + 14, 2) == 0
            and memcmp(f + l4 + 20, first + l4 + 20, h.end - l4 - 20) == 0
            and (f[l4 + 13] & ~0x08) == (first[l4 + 13] & ~0x08))


cdef inline void write_vnet(uint8_t* p, uint8_t flags, uint8_t gso_type, uint16_t hdr_len,
                            uint16_t gso_size, uint16_t csum_start, uint16_t csum_offset) noexcept nogil:
    p[0] = flags
    p[1] = gso_type
    p[2] = hdr_len & 0xFF
    p[3] = hdr_len >> 8
    p[4] = gso_size & 0xFF
    p[5] = gso_size >> 8
    p[6] = csum_start & 0xFF
    p[7] = csum_start >> 8
    p[8] = csum_offset & 0xFF
    p[9] = csum_offset >> 8


cdef Py_ssize_t merge_run(FrameBatch b, const Py_ssize_t* run, Py_ssize_t count, const Seg* h,
                          const Seg* last, uint8_t* out) noexcept nogil:
    """offload._merge into ``out`` (a frame, with room for the virtio-net header before it);
    returns the frame's length."""
    cdef Py_ssize_t k, n = h.end, l4 = h.l4, tcp_len
    cdef uint64_t acc
    memcpy(out, b.frame_ptr(run[0]), h.end)
    for k in range(count):
        memcpy(out + n, b.frame_ptr(run[k]) + h.end, b.length[run[k]] - h.end)
        n += b.length[run[k]] - h.end
    out[l4 + 13] |= last.flags & 0x08
    tcp_len = n - l4
    if h.v6:
        put16(out + 18, n - 54)
        acc = ones_add(out + 22, 32, 6 + tcp_len)
    else:
        put16(out + 16, n - 14)
        put16(out + 24, 0)
        put16(out + 24, ~fold(ones_add(out + 14, 20, 0)) & 0xFFFF)
        acc = ones_add(out + 26, 8, 6 + tcp_len)
    put16(out + l4 + 16, fold(acc))
    write_vnet(out - VNET_HLEN, F_NEEDS_CSUM, GSO_TCPV6 if h.v6 else GSO_TCPV4, h.end, h.payload, l4, 16)
    return n
