# ---- codec.pxi: the VXLAN header and the flow hash, as in overlay/core/wire.py ----
#
# Read this beside overlay/core/wire.py: each function here is the C copy of the one named in its
# docstring, with the same rules in the same order. Byte loads go through memcpy-free shifts of
# unsigned chars so there is no alignment or endianness assumption.

cdef enum:
    VXLAN_HLEN = 8
    ETH_HLEN = 14
    MIN_DGRAM = VXLAN_HLEN + ETH_HLEN
    FLAG_I = 0x08
    SPORT_MIN = 49152
    SPORT_MASK = 0x3FFF

# Drop reasons: the numbers of overlay.wire.Drop (tests/test_fastpath.py holds them equal).
cdef enum:
    OK = 0
    DROP_TOO_SHORT = 1
    DROP_NO_I_FLAG = 2
    DROP_INNER_TOO_SHORT = 3
    DROP_UNKNOWN_VNI = 4
    DROP_INNER_VLAN = 5
    DROP_NO_PEERS = 6
    DROP_OUT_OF_ROOM = 7
    DROP_NOT_MEMBER = 8
    DROP_TOO_BIG = 9
    DROP_TX_ERROR = 10
    DROP_TAP_WRITE = 11
    DROP_OVERSIZE = 12
    DROP_BAD_OFFLOAD = 13
    DROP_ROUTER_ADVERT = 14
    DROP_AUTH_FAILED = 15
    DROP_REPLAYED = 16
    DROP_NOT_ENCRYPTED = 17
    DROP_NO_SESSION = 18
    DROP_HANDSHAKE_LIMITED = 19
    N_DROP_REASONS = 20
    PUNTED = 255        # a slot's status: a handshake message handed to Python, not a drop


cdef inline uint32_t be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t be24(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef inline uint64_t mac48(const uint8_t* p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24)
            | (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | p[5])


cdef inline bint is_vlan_ethertype(uint32_t t) noexcept nogil:
    """wire.VLAN_ETHERTYPES"""
    return t == 0x8100 or t == 0x88A8 or t == 0x9100


cdef inline void write_header(uint8_t* p, uint32_t vni) noexcept nogil:
    """wire.encode: flags = I, all reserved bits zero, VNI in bytes 4..6."""
    p[0] = FLAG_I
    p[1] = 0
    p[2] = 0
    p[3] = 0
    p[4] = (vni >> 16) & 0xFF
    p[5] = (vni >> 8) & 0xFF
    p[6] = vni & 0xFF
    p[7] = 0


cdef inline int check_header(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """wire.decode, rules 1-3 (rule 4, the VNI, needs the table; rule 5 the frame)."""
    if n < VXLAN_HLEN:
        return DROP_TOO_SHORT
    if not (p[0] & FLAG_I):
        return DROP_NO_I_FLAG
    if n < MIN_DGRAM:
        return DROP_INNER_TOO_SHORT
    return OK


cdef inline uint32_t header_vni(const uint8_t* p) noexcept nogil:
    return be24(p + 4)


cdef inline uint32_t fnv1a32(uint32_t h, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """wire.fnv1a32, continuing from ``h`` (start with 0x811C9DC5)."""
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * <uint32_t>0x01000193
    return h


cdef inline bint is_ported(uint8_t proto) noexcept nogil:
    """wire.PORTED_PROTOCOLS: TCP, UDP, SCTP."""
    return proto == 6 or proto == 17 or proto == 132


cdef inline uint32_t flow_hash(const uint8_t* f, Py_ssize_t n) noexcept nogil:
    """wire.fnv1a32(wire.flow_key(frame)): the same key bytes, hashed in the same order."""
    cdef uint32_t h = 0x811C9DC5
    cdef uint32_t ethertype = be16(f + 12)
    cdef Py_ssize_t l3 = ETH_HLEN, ihl, l4
    cdef uint8_t proto
    if ethertype == 0x0800 and n >= l3 + 20:
        ihl = (f[l3] & 0x0F) * 4
        if ihl >= 20 and n >= l3 + ihl:
            proto = f[l3 + 9]
            h = fnv1a32(h, f + l3 + 12, 8)
            h = fnv1a32(h, &proto, 1)
            l4 = l3 + ihl
            if is_ported(proto) and (be16(f + l3 + 6) & 0x3FFF) == 0 and n >= l4 + 4:
                h = fnv1a32(h, f + l4, 4)
            return h
    if ethertype == 0x86DD and n >= l3 + 40:
        proto = f[l3 + 6]
        h = fnv1a32(h, f + l3 + 8, 32)
        h = fnv1a32(h, &proto, 1)
        l4 = l3 + 40
        if is_ported(proto) and n >= l4 + 4:
            h = fnv1a32(h, f + l4, 4)
        return h
    return fnv1a32(h, f, ETH_HLEN)


cdef inline uint16_t source_port(const uint8_t* f, Py_ssize_t n) noexcept nogil:
    """wire.source_port"""
    cdef uint32_t h = flow_hash(f, n)
    return SPORT_MIN + ((h ^ (h >> 16)) & SPORT_MASK)
