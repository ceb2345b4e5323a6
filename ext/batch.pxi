# ---- batch.pxi: frame buffers and the two batch stages, encapsulate and decapsulate ----

cdef enum:
    # Bytes in front of every frame: the VXLAN header (8) in the last 8, so a datagram starts on
    # a cache line and header + Ethernet + IPv4 + ports (8+14+20+4 bytes) share that one line;
    # the 64 before it are for later headers (virtio-net, UDP for raw sends).
    HEADROOM = 64 + 8
    TAILROOM = 24       # behind every frame: room for an AEAD tag (16; crypto.pxi)
    COPY_SLOTS = 256    # encrypted floods: copies of a frame per VTEP, per encap call (grown for a larger flood list)
    # Table lookups of a batch run this many frames ahead of their use as prefetches: enough to
    # keep several cache misses in flight, few enough that the CPU does not drop them.
    PREFETCH_AHEAD = 16


cdef class FrameBatch:
    """A preallocated pool of ``slots`` buffers of ``slot_size`` bytes, and per-slot metadata.

    Slot i: [ HEADROOM | frame (length[i] bytes) | ... | TAILROOM ]. The VXLAN header lives in
    the 8 bytes just before the frame, so a datagram is received at HEADROOM - 8 (recvmmsg
    iovecs point there) and a frame is read at HEADROOM (TAP reads point there); encapsulation
    and decapsulation then only write or check those 8 bytes, the frame is never copied.
    ``out_*`` list the datagrams encap produced: (slot, VTEP id, UDP source port), one per
    destination, so a flooded frame is sent from one buffer to many VTEPs (sendmmsg entries).
    """

    cdef uint8_t* mem
    cdef readonly Py_ssize_t slots, slot_size, out_capacity
    cdef uint32_t* length       # inner frame length (encap input, decap output)
    cdef uint32_t* dgram_len    # received datagram length (decap input, as recvmmsg's msg_len)
    cdef uint8_t* status        # per slot after a stage: 0 or an overlay.core.wire.Drop value
    cdef uint32_t* vni          # per slot after decap
    cdef Addr* src_ip           # per slot before decap: outer source address (either family)
    cdef uint8_t* truncated     # per slot before decap: larger than the slot (MSG_TRUNC)
    cdef uint32_t* gso          # per slot after recvmmsg: UDP_GRO datagram size, 0 if one datagram
    cdef uint32_t* msg_vtep     # per send message: its VTEP id
    cdef uint64_t* msg_bytes    # per send message: inner bytes
    cdef public int io_error    # errno of a failed TAP read or recvmmsg (not EAGAIN), else 0
    cdef uint64_t* scratch      # per slot: hash of the lookup key, so lookups can prefetch
    cdef uint16_t* out_slot
    cdef uint32_t* out_vtep
    cdef uint16_t* out_sport
    cdef uint8_t** out_ptr      # per output: the datagram to send (the slot's, or a sealed copy's)
    cdef uint32_t* out_len
    cdef uint8_t* enc           # per slot before decap: an encrypted datagram, placed 16 bytes early
    cdef uint8_t* copies        # copy_cap slots for encrypted floods, allocated on first use
    cdef Py_ssize_t n_copies, copy_cap
    cdef readonly Py_ssize_t n_out
    cdef Py_ssize_t max_frame_c
    cdef IoArrays rx            # recvmmsg headers, one per slot
    cdef IoArrays tx            # sendmmsg headers, one per output

    def __cinit__(self, Py_ssize_t slots=64, Py_ssize_t slot_size=2048, Py_ssize_t out_capacity=0):
        if slots < 1 or slots > 65535:
            raise ValueError(f"slots must be 1..65535, got {slots}")
        if slot_size < 128 or slot_size % 64 or slot_size > (1 << 20):
            raise ValueError(f"slot_size must be a multiple of 64 from 128 to 1 MiB, got {slot_size}")
        if out_capacity < 0 or out_capacity > (1 << 20):
            raise ValueError(f"out_capacity must be 0 (default) to 1048576, got {out_capacity}")
        self.slots = slots
        self.slot_size = slot_size
        self.out_capacity = out_capacity if out_capacity > 0 else max(slots * 4, 1024)
        self.mem = <uint8_t*>aligned_alloc(64, slots * slot_size)
        self.length = <uint32_t*>calloc(slots, sizeof(uint32_t))
        self.dgram_len = <uint32_t*>calloc(slots, sizeof(uint32_t))
        self.status = <uint8_t*>calloc(slots, sizeof(uint8_t))
        self.vni = <uint32_t*>calloc(slots, sizeof(uint32_t))
        self.src_ip = <Addr*>calloc(slots, sizeof(Addr))
        self.truncated = <uint8_t*>calloc(slots, sizeof(uint8_t))
        self.gso = <uint32_t*>calloc(slots, sizeof(uint32_t))
        self.msg_vtep = <uint32_t*>calloc(self.out_capacity, sizeof(uint32_t))
        self.msg_bytes = <uint64_t*>calloc(self.out_capacity, sizeof(uint64_t))
        if self.gso == NULL or self.msg_vtep == NULL or self.msg_bytes == NULL:
            raise MemoryError()
        self.max_frame_c = slot_size - HEADROOM - TAILROOM
        io_init(&self.rx, slots)
        io_init(&self.tx, self.out_capacity)
        self.scratch = <uint64_t*>calloc(slots, sizeof(uint64_t))
        self.out_slot = <uint16_t*>calloc(self.out_capacity, sizeof(uint16_t))
        self.out_vtep = <uint32_t*>calloc(self.out_capacity, sizeof(uint32_t))
        self.out_sport = <uint16_t*>calloc(self.out_capacity, sizeof(uint16_t))
        self.out_ptr = <uint8_t**>calloc(self.out_capacity, sizeof(uint8_t*))
        self.out_len = <uint32_t*>calloc(self.out_capacity, sizeof(uint32_t))
        self.enc = <uint8_t*>calloc(slots, sizeof(uint8_t))
        if self.out_ptr == NULL or self.out_len == NULL or self.enc == NULL:
            raise MemoryError()
        if (self.mem == NULL or self.length == NULL or self.dgram_len == NULL or self.status == NULL or self.vni == NULL
                or self.src_ip == NULL or self.truncated == NULL or self.scratch == NULL or self.out_slot == NULL
                or self.out_vtep == NULL or self.out_sport == NULL):
            raise MemoryError()
        memset(self.mem, 0, slots * slot_size)

    def __dealloc__(self):
        free(self.mem); free(self.length); free(self.dgram_len); free(self.status); free(self.vni); free(self.src_ip)
        free(self.scratch); free(self.out_slot); free(self.out_vtep); free(self.out_sport)
        free(self.truncated); free(self.gso); free(self.msg_vtep); free(self.msg_bytes)
        free(self.out_ptr); free(self.out_len); free(self.enc); free(self.copies)
        io_free(&self.rx)
        io_free(&self.tx)

    @property
    def max_frame(self):
        """The largest frame a slot holds."""
        return self.slot_size - HEADROOM - TAILROOM

    cdef inline uint8_t* frame_ptr(self, Py_ssize_t i) noexcept nogil:
        return self.mem + i * self.slot_size + HEADROOM

    cdef bint alloc_copies(self, Py_ssize_t need) noexcept nogil:
        """Room for ``need`` sealed copies (at least COPY_SLOTS); only while no output points
        into the old area (encap calls it for the first frame of a call)."""
        cdef Py_ssize_t cap = max(need, <Py_ssize_t>COPY_SLOTS)
        cdef uint8_t* grown = <uint8_t*>aligned_alloc(64, cap * self.slot_size)
        if grown == NULL:
            return False
        free(self.copies)
        self.copies = grown
        self.copy_cap = cap
        return True

    cdef inline uint8_t* copy_ptr(self, Py_ssize_t k) noexcept nogil:
        return self.copies + k * self.slot_size + HEADROOM

    cdef int check_slot(self, Py_ssize_t i) except -1:
        if not 0 <= i < self.slots:
            raise IndexError(f"slot {i} out of range 0..{self.slots - 1}")
        return 0

    # Python-level access: for tests, benchmarks and tools, never the per-packet path.

    def put_frame(self, Py_ssize_t i, const uint8_t[:] frame):
        """Place an inner Ethernet frame in slot i (as a TAP read would)."""
        self.check_slot(i)
        if frame.shape[0] > self.max_frame:
            raise ValueError(f"frame of {frame.shape[0]} bytes exceeds the slot's {self.max_frame}")
        if frame.shape[0]:
            memcpy(self.frame_ptr(i), &frame[0], frame.shape[0])
        self.length[i] = frame.shape[0]

    def put_datagram(self, Py_ssize_t i, const uint8_t[:] datagram, src_ip=0):
        """Place a received UDP payload in slot i (as recvmmsg would), from ``src_ip`` (an
        address int: IPv4, or 1 << 128 | IPv6)."""
        cdef Addr a
        self.check_slot(i)
        if src_ip:
            addr_from_py(src_ip, &a)
        else:
            addr_v4(&a, 0)
        self.enc[i] = datagram.shape[0] > 0 and datagram[0] == SEAL_DATA
        if datagram.shape[0] > self.max_frame + VXLAN_HLEN + (SEAL_OVERHEAD if self.enc[i] else 0):
            raise ValueError(f"datagram of {datagram.shape[0]} bytes exceeds the slot")
        if datagram.shape[0]:
            memcpy(self.frame_ptr(i) - VXLAN_HLEN - (SEAL_HLEN if self.enc[i] else 0), &datagram[0], datagram.shape[0])
        self.dgram_len[i] = datagram.shape[0]
        self.truncated[i] = 0
        self.length[i] = 0
        self.src_ip[i] = a

    def set_macs(self, const uint8_t[:] macs, Py_ssize_t where=0):
        """Overwrite 6 bytes at ``where`` (0: destination MAC, 6: source MAC) of each frame
        i < len(macs) // 6 with macs[6i:6i+6]: a benchmark gives every batch fresh
        addresses this way, as new TAP reads would, without rebuilding the frames."""
        cdef Py_ssize_t i, n = macs.shape[0] // 6
        if n > self.slots or not 0 <= where <= 8:
            raise ValueError("more MACs than slots, or where not in 0..8")
        for i in range(n):
            memcpy(self.frame_ptr(i) + where, &macs[6 * i], 6)

    def frame(self, Py_ssize_t i):
        """The inner frame of slot i (after decap: the decapsulated frame)."""
        self.check_slot(i)
        return (<char*>self.frame_ptr(i))[:self.length[i]]

    def datagram(self, Py_ssize_t i):
        """The VXLAN datagram of slot i (after encap: header + frame)."""
        self.check_slot(i)
        return (<char*>self.frame_ptr(i) - VXLAN_HLEN)[:self.length[i] + VXLAN_HLEN]

    def result(self, Py_ssize_t i):
        """(status, vni) of slot i after the last stage; status 0 or an overlay.wire.Drop."""
        self.check_slot(i)
        return self.status[i], self.vni[i]

    def outputs(self):
        """[(slot, VTEP id, UDP source port)] produced by the last encap."""
        return [(self.out_slot[j], self.out_vtep[j], self.out_sport[j]) for j in range(self.n_out)]

    def output(self, Py_ssize_t j):
        """The UDP payload of output j of the last encap, as it is sent (sealed on an encrypted
        network, else the VXLAN datagram)."""
        if not 0 <= j < self.n_out:
            raise IndexError(f"output {j} out of range 0..{self.n_out - 1}")
        return (<char*>self.out_ptr[j])[:self.out_len[j]]


# ---- the stages ---------------------------------------------------------------------------


cdef Py_ssize_t encap_batch(ForwardingCore core, FrameBatch b, uint32_t vni,
                            Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Encapsulate frames start..stop-1 of ``b`` for ``vni``; return the next slot to do.

    Per frame: look the destination MAC up ((vni, MAC) -> VTEP; group or unknown MACs go to
    the VNI's flood list), write the VXLAN header in front, hash the flow to a source port,
    and append one output per destination VTEP. Stops early (returning the first slot not
    done) when the outputs are full; a frame whose fan-out alone exceeds them is dropped.
    Two passes so that table lookups overlap their cache misses: the first hashes every
    destination, the second looks each up while prefetching the slot PREFETCH_AHEAD frames on.
    """
    cdef Net* net = core.net_of(vni)
    cdef Py_ssize_t i, j, n_out = 0
    cdef uint8_t* f
    cdef uint8_t* p
    cdef uint32_t fanout, vtep, dlen
    cdef uint16_t sport
    cdef Slot* s
    b.n_out = 0
    b.n_copies = 0
    if net == NULL:
        for i in range(start, stop):
            b.status[i] = DROP_UNKNOWN_VNI
        core.drop_counts[DROP_UNKNOWN_VNI] += stop - start
        return stop
    for i in range(start, stop):
        f = b.frame_ptr(i)
        b.scratch[i] = hm_hash(mac48(f), vni + 1)
        if i < start + PREFETCH_AHEAD:
            hm_prefetch(&core.fdb, b.scratch[i])
    for i in range(start, stop):
        if i + PREFETCH_AHEAD < stop:
            hm_prefetch(&core.fdb, b.scratch[i + PREFETCH_AHEAD])
        f = b.frame_ptr(i)
        b.vni[i] = vni
        if b.length[i] < ETH_HLEN:
            b.status[i] = DROP_INNER_TOO_SHORT
            core.drop_counts[DROP_INNER_TOO_SHORT] += 1
            continue
        if not core.allow_vlan and is_vlan_ethertype(be16(f + 12)):
            b.status[i] = DROP_INNER_VLAN
            core.drop_counts[DROP_INNER_VLAN] += 1
            continue
        s = NULL if f[0] & 1 else hm_find_h(&core.fdb, mac48(f), vni + 1, b.scratch[i])
        fanout = 1 if s != NULL else net.nflood
        if fanout == 0:
            b.status[i] = DROP_NO_PEERS
            core.drop_counts[DROP_NO_PEERS] += 1
            continue
        if net.encrypted and fanout > 1 and n_out == 0 and fanout > b.copy_cap and not b.alloc_copies(fanout):
            b.status[i] = DROP_OUT_OF_ROOM
            core.drop_counts[DROP_OUT_OF_ROOM] += 1
            continue
        if n_out + fanout > b.out_capacity or (net.encrypted and fanout > 1 and b.n_copies + fanout > b.copy_cap):
            if n_out == 0:
                b.status[i] = DROP_OUT_OF_ROOM
                core.drop_counts[DROP_OUT_OF_ROOM] += 1
                continue
            b.n_out = n_out
            return i
        if core.learn_local:
            core.note_local(vni, f, b.length[i])
        write_header(f - VXLAN_HLEN, vni)
        sport = source_port(f, b.length[i])
        b.status[i] = OK
        dlen = VXLAN_HLEN + b.length[i]
        for j in range(fanout):
            vtep = (s.value & VTEP_MASK) if s != NULL else net.flood[j]
            p = f - VXLAN_HLEN
            if net.encrypted:
                if not core.can_seal(vtep):
                    core.want(vtep)                     # counted NO_SESSION; a handshake follows
                    continue
                if fanout > 1:                          # one sealed copy per VTEP: the plaintext stays
                    p = b.copy_ptr(b.n_copies) - VXLAN_HLEN
                    b.n_copies += 1
                    memcpy(p, f - VXLAN_HLEN, dlen)
                if not core.seal_for(vtep, p - SEAL_HLEN, dlen):
                    core.drop_counts[DROP_TX_ERROR] += 1
                    continue
                b.out_ptr[n_out] = p - SEAL_HLEN
                b.out_len[n_out] = dlen + SEAL_OVERHEAD
            else:
                b.out_ptr[n_out] = p
                b.out_len[n_out] = dlen
            b.out_slot[n_out] = <uint16_t>i
            b.out_vtep[n_out] = vtep
            b.out_sport[n_out] = sport
            n_out += 1
    b.n_out = n_out
    return stop


cdef Py_ssize_t decap_batch(ForwardingCore core, FrameBatch b, Py_ssize_t n) noexcept nogil:
    """Decapsulate datagrams 0..n-1 of ``b`` in place; return how many passed.

    Per datagram (dgram_len[i] bytes at HEADROOM - 8): the receive rules of overlay/core/wire.py in
    the same order (header, VNI, inner VLAN), the source check (NOT_MEMBER, when on), then
    learning (source MAC -> outer source address). A passing slot gets status 0, its VNI, and length = the inner frame's length,
    with the frame at HEADROOM. A sealed datagram (enc[i], placed 16 bytes early) is opened
    first (crypto.pxi) and then obeys the same rules; plaintext for an encrypted VNI is dropped
    (NOT_ENCRYPTED); a handshake message is queued for Python (status PUNTED, not a drop).
    A plaintext input is not modified, so decap can run again on it; a sealed one is opened in place.
    """
    cdef Py_ssize_t i, passed = 0
    cdef uint8_t* d
    cdef uint8_t* f
    cdef int st
    cdef uint32_t vni
    cdef CVtep* peer = NULL
    cdef Net* net
    for i in range(n):
        f = b.frame_ptr(i)
        d = f - VXLAN_HLEN
        if b.truncated[i]:
            st = DROP_OVERSIZE
        elif b.enc[i]:                                  # sealed: open first (crypto.pxi)
            st = core.open_datagram(d - SEAL_HLEN, b.dgram_len[i], &b.src_ip[i])
            if st == OK:
                b.dgram_len[i] -= SEAL_OVERHEAD
                if b.dgram_len[i] == 0:             # a keepalive: it confirmed the session, no more
                    b.status[i] = PUNTED
                    continue
                st = check_header(d, b.dgram_len[i])
        elif b.dgram_len[i] and (d[0] == HS_INITIATION or d[0] == HS_RESPONSE):
            if b.dgram_len[i] != (HS_INITIATION_LEN if d[0] == HS_INITIATION else HS_RESPONSE_LEN):
                st = DROP_AUTH_FAILED                   # no handshake message has that size
            else:
                core.punt_handshake(d, b.dgram_len[i], &b.src_ip[i])
                b.status[i] = PUNTED
                continue
        else:
            st = check_header(d, b.dgram_len[i])
        if st == OK:
            vni = header_vni(d)
            b.vni[i] = vni
            net = core.net_of(vni)
            if net == NULL:
                st = DROP_UNKNOWN_VNI
            elif net.encrypted and not b.enc[i]:
                st = DROP_NOT_ENCRYPTED                 # plaintext for an encrypted VNI, whoever sent it
            elif not core.allow_vlan and is_vlan_ethertype(be16(f + 12)):
                st = DROP_INNER_VLAN
            else:
                peer = core.member(&b.src_ip[i], vni)
                if peer == NULL and (core.source_check or b.enc[i]):  # a session proves a host, not membership
                    st = DROP_NOT_MEMBER
        b.status[i] = st
        if st != OK:
            core.drop_counts[st] += 1
            continue
        b.length[i] = b.dgram_len[i] - VXLAN_HLEN
        if peer != NULL:
            peer.rx_frames += 1
            peer.rx_bytes += b.length[i]
        b.scratch[i] = hm_hash(mac48(f + 6), vni + 1)
        if passed < PREFETCH_AHEAD:
            hm_prefetch(&core.fdb, b.scratch[i])
        passed += 1
    # Pass two, learning: source MAC lookups, each prefetched PREFETCH_AHEAD frames before.
    for i in range(n):
        if i + PREFETCH_AHEAD < n and b.status[i + PREFETCH_AHEAD] == OK:
            hm_prefetch(&core.fdb, b.scratch[i + PREFETCH_AHEAD])
        if b.status[i] == OK:
            core.note_source(b.vni[i], b.frame_ptr(i), &b.src_ip[i], b.scratch[i])
    return passed
