# ---- table.pxi: the forwarding state the fast path reads: VNIs, VTEPs, FDB, flood lists ----
#
# overlay/core/fdb.py decides what goes in here (precedence, ageing, caps) and pushes each change
# through ForwardingCore's fdb_set/fdb_delete/flood_set/vni_add/vni_remove. The batch loops in
# batch.pxi only read it, with no Python call per packet. VTEPs are interned to small integer
# ids so an FDB slot stays 16 bytes; an id is never reused while the core lives.

cdef enum:
    MAX_VTEPS = 1 << 20
    LEARN_RING = 256
cdef uint32_t HIT = 0x80000000u        # FDB value bit: a frame from this MAC came from its VTEP
cdef uint32_t VTEP_MASK = 0x7FFFFFFFu
cdef uint64_t V4_MAPPED = 0x0000FFFF00000000u   # ::ffff:0:0/96, the IPv4 addresses in an Addr

# Addresses of both families in one form: 16 bytes as two big-endian words, IPv4 as its
# IPv4-mapped IPv6 address (::ffff:a.b.c.d), as a dual-stack socket would show it. At the
# Python level an address is an int: IPv4 its 32-bit value, IPv6 its 128-bit value | 1 << 128
# (overlay/fastpath/api.py: to_c / from_c).
cdef struct Addr:
    uint64_t hi
    uint64_t lo

cdef inline bint addr_is4(const Addr* a) noexcept nogil:
    return a.hi == 0 and (a.lo >> 32) == 0xFFFF

cdef inline bint addr_eq(const Addr* a, const Addr* b) noexcept nogil:
    return a.lo == b.lo and a.hi == b.hi

cdef inline void addr_v4(Addr* a, uint32_t ip) noexcept nogil:
    a.hi = 0
    a.lo = V4_MAPPED | ip

cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>be32(p) << 32) | be32(p + 4)

cdef inline void addr_load6(Addr* a, const uint8_t* p) noexcept nogil:
    """The 16 network-order bytes at ``p`` (an IPv6 address)."""
    a.hi = be64(p)
    a.lo = be64(p + 8)

cdef inline void addr_store6(const Addr* a, uint8_t* p) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = (a.hi >> (56 - 8 * k)) & 0xFF
        p[8 + k] = (a.lo >> (56 - 8 * k)) & 0xFF

cdef uint64_t ADDR_SEED = 0   # set once per process from the clock: IPv6 keys are not guessable

cdef inline uint64_t addr_key(const Addr* a) noexcept nogil:
    """The 64-bit hash-table key of an address: exact for IPv4 (its mapped form), a seeded
    hash for IPv6. Every lookup by key checks the whole address behind it."""
    if a.hi == 0:
        return a.lo
    return hm_hash(a.hi ^ ADDR_SEED, 0x6) ^ a.lo

cdef int addr_from_py(object x, Addr* a) except -1:
    cdef object v
    if x < 0 or x >> 129:
        raise ValueError(f"address int {x!r}: IPv4 as 0..2**32-1, IPv6 as 2**128 | its value")
    if x >> 128:
        v = x & ((1 << 128) - 1)
        a.hi = <uint64_t>(v >> 64)
        a.lo = <uint64_t>(v & 0xFFFFFFFFFFFFFFFF)
        if a.hi == 0 and a.lo == 0:
            raise ValueError("the unspecified address :: is no VTEP or neighbour")
        return 0
    if x >> 32:
        raise ValueError(f"address int {x!r}: IPv4 as 0..2**32-1, IPv6 as 2**128 | its value")
    addr_v4(a, <uint32_t>x)
    return 0

cdef object addr_to_py(const Addr* a):
    if addr_is4(a):
        return <uint32_t>(a.lo & 0xFFFFFFFFu)
    return (1 << 128) | (<object>a.hi << 64) | <object>a.lo


cdef struct Handshake:     # a handshake message for Python (crypto.pxi)
    uint8_t data[HS_MAX]
    uint32_t length
    Addr ip


cdef struct CVtep:
    Addr ip
    uint16_t port
    uint64_t rx_frames, rx_bytes, tx_frames, tx_bytes   # inner frames and their bytes
    Aead tx                  # encrypted networks: the session this host seals with (aead_ready)
    uint32_t tx_index        # ... the peer's receiver index for it
    uint64_t tx_counter      # ... the next counter
    bint wanted              # queued for take_wanted: traffic but no session

cdef enum:
    LOCAL_SEEN = 1       # local map value bits: the MAC was reported,
    LOCAL_V4 = 2         # ... with its first IPv4 address,
    LOCAL_V6 = 4         # ... with its first global IPv6 address

cdef struct Net:
    uint32_t vni
    uint32_t nflood
    uint32_t* flood      # VTEP ids that get broadcast, multicast and unknown unicast
    int tap_fd           # where its received frames go; -1: the pump's tap_fd
    bint used
    bint encrypted       # every datagram sealed; plaintext VXLAN for it dropped (NOT_ENCRYPTED)

cdef struct Learned:
    uint32_t vni
    uint64_t mac
    Addr ip              # learned: the outer source; local: the address it sent from (0: none)


cdef class ForwardingCore:
    """The C tables behind the fast path. Keys: VNI (0..2^24-1), MAC (48-bit int), addresses
    of either family as ints (IPv4: its value; IPv6: 1 << 128 | its value).

    One thread owns a core and its batches: the batch calls release the GIL and hold pointers
    into these tables, so changing them from another thread meanwhile is not allowed (the
    agent is single-threaded: table changes and pumps run on its one event loop)."""

    cdef HashMap fdb          # (mac, vni + 1) -> VTEP id | HIT
    cdef HashMap vni_index    # (vni, 1) -> index into nets
    cdef HashMap vtep_ids     # (addr_key, port + 1) -> VTEP id
    cdef HashMap members      # (addr_key, vni + 1) -> VTEP id, for every VTEP on a VNI's flood list
    cdef HashMap neigh        # (addr_key, vni + 1) -> index into neigh_macs: ARP and NS suppression
    cdef uint64_t* neigh_macs
    cdef Addr* neigh_addrs    # beside neigh_macs: the address, checked on every lookup
    cdef uint32_t n_neigh_macs, cap_neigh_macs
    cdef uint32_t* neigh_free  # indexes of neigh_macs free for reuse
    cdef uint32_t n_neigh_free
    cdef readonly uint64_t arp_suppressed   # ARP requests answered from the registry
    cdef readonly uint64_t nd_suppressed    # IPv6 neighbour solicitations answered from it
    cdef HashMap local        # (mac, vni + 1) -> LOCAL_V4 | LOCAL_V6: MACs behind our own TAP,
                              # and which families' first address was reported
    cdef public bint learn_local            # queue new local MACs for take_local (etcd mode)
    cdef Learned local_new[LEARN_RING]
    cdef uint32_t n_local_new
    cdef CVtep* vteps
    cdef uint32_t n_vteps, cap_vteps
    cdef Net* nets
    cdef uint32_t n_nets
    cdef readonly bint allow_vlan
    cdef public bint source_check   # drop datagrams whose source is not a member of the VNI
    cdef uint64_t drop_counts[N_DROP_REASONS]
    cdef Learned learned[LEARN_RING]
    cdef uint32_t n_learned
    cdef readonly uint64_t learn_overflow
    cdef readonly uint64_t coalesced    # received frames written to the TAP inside super-frames
    cdef HashMap rx_index     # (receiver index, 1) -> index into rxs: sessions we open with
    cdef RxSession* rxs
    cdef uint32_t n_rxs, cap_rxs
    cdef uint32_t wanted[LEARN_RING]      # VTEP ids with traffic but no session (take_wanted)
    cdef uint32_t n_wanted
    cdef uint32_t confirmed[LEARN_RING]   # receiver indexes with their first datagram (take_confirmed)
    cdef uint32_t n_confirmed
    cdef Addr stale[LEARN_RING]           # sources of data with a receiver index we do not have (take_stale)
    cdef uint32_t n_stale
    cdef Handshake* handshakes            # handshake messages for Python (take_handshakes)
    cdef uint32_t n_handshakes

    def __cinit__(self, Py_ssize_t capacity=1024, bint allow_vlan=False, bint source_check=False):
        if not 0 <= capacity <= (1 << 28):
            raise ValueError(f"capacity must be 0 to {1 << 28} entries, got {capacity}")
        hm_init(&self.fdb, max(capacity, 16))
        hm_init(&self.vni_index, 16)
        hm_init(&self.vtep_ids, 16)
        hm_init(&self.members, 16)
        hm_init(&self.neigh, 16)
        hm_init(&self.local, 16)
        hm_init(&self.rx_index, 16)
        self.handshakes = <Handshake*>calloc(HS_RING, sizeof(Handshake))
        if self.handshakes == NULL:
            raise MemoryError()
        global ADDR_SEED
        if ADDR_SEED == 0:
            ADDR_SEED = hm_hash(<uint64_t>(time.time_ns()) ^ <uint64_t>id(self), 0x5EED) | 1
        self.source_check = source_check
        self.cap_vteps = 16
        self.vteps = <CVtep*>calloc(self.cap_vteps, sizeof(CVtep))
        self.nets = <Net*>calloc(1, sizeof(Net))
        if self.vteps == NULL or self.nets == NULL:
            raise MemoryError()
        self.allow_vlan = allow_vlan
        memset(self.drop_counts, 0, sizeof(self.drop_counts))

    def __dealloc__(self):
        cdef uint32_t i
        hm_free(&self.fdb)
        hm_free(&self.vni_index)
        hm_free(&self.vtep_ids)
        hm_free(&self.members)
        hm_free(&self.neigh)
        hm_free(&self.local)
        hm_free(&self.rx_index)
        for i in range(self.n_vteps):
            aead_free(&self.vteps[i].tx)
        for i in range(self.n_rxs):
            aead_free(&self.rxs[i].aead)
        free(self.rxs)
        free(self.handshakes)
        free(self.neigh_macs)
        free(self.neigh_addrs)
        free(self.neigh_free)
        if self.nets != NULL:
            for i in range(self.n_nets):
                free(self.nets[i].flood)
        free(self.nets)
        free(self.vteps)

    # --- VNIs and flood lists -------------------------------------------------------------

    cdef Net* net_of(self, uint32_t vni) noexcept nogil:
        cdef Slot* s = hm_find(&self.vni_index, vni, 1)
        return NULL if s == NULL else &self.nets[s.value]

    def vni_add(self, uint32_t vni):
        """Serve ``vni`` (idempotent): frames on it are no longer UNKNOWN_VNI drops."""
        cdef uint32_t i
        cdef Net* grown
        if vni > 0xFFFFFF:
            raise ValueError(f"VNI {vni} is out of range: 0 to 16777215")
        if self.net_of(vni) != NULL:
            return
        for i in range(self.n_nets):
            if not self.nets[i].used:
                break
        else:
            grown = <Net*>realloc(self.nets, (self.n_nets + 1) * sizeof(Net))
            if grown == NULL:
                raise MemoryError()
            self.nets = grown
            i = self.n_nets
            self.n_nets += 1
        self.nets[i].vni = vni
        self.nets[i].tap_fd = -1
        self.nets[i].nflood = 0
        self.nets[i].flood = NULL
        self.nets[i].used = True
        self.nets[i].encrypted = False
        hm_set(&self.vni_index, vni, 1, i)

    def vni_remove(self, uint32_t vni):
        """Stop serving ``vni``. Its FDB entries must be deleted by the caller (fdb.py does)."""
        cdef Net* net = self.net_of(vni)
        if net == NULL:
            return
        self.flood_set(vni, [])
        net = self.net_of(vni)
        free(net.flood)
        net.flood = NULL
        net.nflood = 0
        net.used = False
        hm_delete(&self.vni_index, vni, 1)

    def flood_set(self, uint32_t vni, vteps):
        """Replace the flood list of ``vni`` with ``vteps``: (ip, port) pairs."""
        cdef Net* net = self.net_of(vni)
        cdef list ids
        cdef uint32_t* flood
        cdef Py_ssize_t i
        cdef Addr a
        if net == NULL:
            raise KeyError(f"VNI {vni} is not served; vni_add it first")
        ids = []
        for ip, port in vteps:
            addr_from_py(ip, &a)
            ids.append(self.vtep_id(&a, port))
        flood = <uint32_t*>malloc(max(len(ids), 1) * sizeof(uint32_t))
        if flood == NULL:
            raise MemoryError()
        for i in range(len(ids)):
            flood[i] = ids[i]
        net = self.net_of(vni)   # vtep_id never moves nets, but stay obviously safe
        for i in range(net.nflood):
            hm_delete(&self.members, addr_key(&self.vteps[net.flood[i]].ip), vni + 1)
        free(net.flood)
        net.flood = flood
        net.nflood = len(ids)
        for i in range(net.nflood):
            hm_set(&self.members, addr_key(&self.vteps[flood[i]].ip), vni + 1, flood[i])

    def vni_tap(self, uint32_t vni, int tap_fd):
        """Frames received on ``vni`` go to ``tap_fd`` (an agent with one TAP per network)."""
        cdef Net* net = self.net_of(vni)
        if net == NULL:
            raise KeyError(f"VNI {vni} is not served; vni_add it first")
        net.tap_fd = tap_fd

    def flood_get(self, uint32_t vni):
        cdef Net* net = self.net_of(vni)
        if net == NULL:
            raise KeyError(f"VNI {vni} is not served")
        return [self.vtep(net.flood[i]) for i in range(net.nflood)]

    # --- VTEPs ----------------------------------------------------------------------------

    cdef uint32_t vtep_id(self, const Addr* ip, uint16_t port) except? 0xFFFFFFFF:
        cdef uint64_t key = addr_key(ip)
        cdef Slot* s = hm_find(&self.vtep_ids, key, <uint32_t>port + 1)
        cdef CVtep* grown
        if s != NULL:
            if not addr_eq(&self.vteps[s.value].ip, ip):
                raise OverflowError("two VTEP addresses with one hash key (a 2**-64 chance)")
            return s.value
        if self.n_vteps >= MAX_VTEPS:
            raise OverflowError(f"more than {MAX_VTEPS} distinct VTEPs")
        if self.n_vteps == self.cap_vteps:
            grown = <CVtep*>realloc(self.vteps, self.cap_vteps * 2 * sizeof(CVtep))
            if grown == NULL:
                raise MemoryError()
            self.vteps = grown
            self.cap_vteps *= 2
        memset(&self.vteps[self.n_vteps], 0, sizeof(CVtep))
        self.vteps[self.n_vteps].ip = ip[0]
        self.vteps[self.n_vteps].port = port
        hm_set(&self.vtep_ids, key, <uint32_t>port + 1, self.n_vteps)
        self.n_vteps += 1
        return self.n_vteps - 1

    def vtep(self, uint32_t vtep_id):
        """(ip, port) of an interned VTEP id."""
        if vtep_id >= self.n_vteps:
            raise IndexError(f"no VTEP id {vtep_id}")
        return (addr_to_py(&self.vteps[vtep_id].ip), self.vteps[vtep_id].port)

    # --- FDB ------------------------------------------------------------------------------

    def fdb_set(self, uint32_t vni, uint64_t mac, ip, uint16_t port):
        """(vni, mac) -> VTEP (ip, port). Insert or replace."""
        cdef Addr a
        if vni > 0xFFFFFF or mac >> 48:
            raise ValueError("VNI must fit 24 bits and MAC 48 bits")
        addr_from_py(ip, &a)
        hm_set(&self.fdb, mac, vni + 1, self.vtep_id(&a, port))

    def fdb_delete(self, uint32_t vni, uint64_t mac):
        """Remove (vni, mac); True if it was there."""
        return hm_delete(&self.fdb, mac, vni + 1)

    def fdb_get(self, uint32_t vni, uint64_t mac):
        """(ip, port) for (vni, mac), or None."""
        cdef Slot* s = hm_find(&self.fdb, mac, vni + 1)
        return None if s == NULL else self.vtep(s.value & VTEP_MASK)

    def fdb_load(self, uint32_t vni, macs, ip, uint16_t port):
        """Bulk fdb_set of many MACs to one VTEP (benchmarks and resyncs)."""
        cdef uint32_t vid
        cdef uint64_t mac
        cdef Addr a
        if vni > 0xFFFFFF:
            raise ValueError("VNI must fit 24 bits")
        addr_from_py(ip, &a)
        vid = self.vtep_id(&a, port)
        for mac in macs:
            if mac >> 48:
                raise ValueError("MAC must fit 48 bits")
            hm_set(&self.fdb, mac, vni + 1, vid)

    def __len__(self):
        return self.fdb.count

    # --- neighbours (ARP suppression) -----------------------------------------------------

    def neigh_set(self, uint32_t vni, ip, uint64_t mac):
        """ARP requests (IPv4) or neighbour solicitations (IPv6) on ``vni`` for ``ip`` are
        answered with ``mac``."""
        cdef Addr a
        cdef Slot* s
        cdef uint32_t i
        if vni > 0xFFFFFF or mac >> 48:
            raise ValueError("VNI must fit 24 bits and MAC 48 bits")
        addr_from_py(ip, &a)
        s = hm_find(&self.neigh, addr_key(&a), vni + 1)
        if s != NULL:
            if not addr_eq(&self.neigh_addrs[s.value], &a):
                raise OverflowError("two neighbour addresses with one hash key (a 2**-64 chance)")
            self.neigh_macs[s.value] = mac
            return
        if self.n_neigh_free:
            self.n_neigh_free -= 1
            i = self.neigh_free[self.n_neigh_free]
        else:
            if self.n_neigh_macs == self.cap_neigh_macs:
                self.cap_neigh_macs = max(16, self.cap_neigh_macs * 2)
                self.neigh_macs = <uint64_t*>realloc(self.neigh_macs, self.cap_neigh_macs * sizeof(uint64_t))
                self.neigh_addrs = <Addr*>realloc(self.neigh_addrs, self.cap_neigh_macs * sizeof(Addr))
                self.neigh_free = <uint32_t*>realloc(self.neigh_free, self.cap_neigh_macs * sizeof(uint32_t))
                if self.neigh_macs == NULL or self.neigh_free == NULL or self.neigh_addrs == NULL:
                    raise MemoryError()
            i = self.n_neigh_macs
            self.n_neigh_macs += 1
        self.neigh_macs[i] = mac
        self.neigh_addrs[i] = a
        hm_set(&self.neigh, addr_key(&a), vni + 1, i)

    def neigh_delete(self, uint32_t vni, ip):
        cdef Addr a
        cdef Slot* s
        addr_from_py(ip, &a)
        s = hm_find(&self.neigh, addr_key(&a), vni + 1)
        if s == NULL or not addr_eq(&self.neigh_addrs[s.value], &a):
            return False
        self.neigh_free[self.n_neigh_free] = s.value
        self.n_neigh_free += 1
        hm_delete(&self.neigh, addr_key(&a), vni + 1)
        return True

    cdef inline bint neigh_lookup(self, uint32_t vni, const Addr* ip, uint64_t* mac) noexcept nogil:
        cdef Slot* s = hm_find(&self.neigh, addr_key(ip), vni + 1)
        if s == NULL or not addr_eq(&self.neigh_addrs[s.value], ip):
            return False
        mac[0] = self.neigh_macs[s.value]
        return True

    # --- what the data path saw -----------------------------------------------------------

    def vtep_stats(self):
        """[(ip, port, rx_frames, rx_bytes, tx_frames, tx_bytes)] for every VTEP ever used."""
        cdef uint32_t i
        return [(addr_to_py(&self.vteps[i].ip), self.vteps[i].port, self.vteps[i].rx_frames,
                 self.vteps[i].rx_bytes, self.vteps[i].tx_frames, self.vteps[i].tx_bytes)
                for i in range(self.n_vteps)]

    cdef inline CVtep* member(self, const Addr* ip, uint32_t vni) noexcept nogil:
        """The VTEP at ``ip`` on the flood list of ``vni``, or NULL."""
        cdef Slot* s = hm_find(&self.members, addr_key(ip), vni + 1)
        if s == NULL or not addr_eq(&self.vteps[s.value].ip, ip):
            return NULL
        return &self.vteps[s.value]

    def drops(self):
        """Drop counts indexed by overlay.wire.Drop value (index 0 unused)."""
        return [self.drop_counts[i] for i in range(N_DROP_REASONS)]

    def take_learned(self):
        """(vni, mac, ip) of source MACs seen from a VTEP the table does not have them at,
        since the last call; for fdb.ForwardingTable.learn. At most LEARN_RING per call."""
        out = [(self.learned[i].vni, self.learned[i].mac, addr_to_py(&self.learned[i].ip))
               for i in range(self.n_learned)]
        self.n_learned = 0
        return out

    def take_hits(self):
        """(vni, mac) of entries that frames came from since the last call; clears the marks.
        For fdb.ForwardingTable.touch, so learned entries in use do not age out."""
        cdef uint64_t i
        cdef Slot* s
        out = []
        for i in range(self.fdb.mask + 1):
            s = &self.fdb.slots[i]
            if s.tag != 0 and s.value & HIT:
                s.value &= VTEP_MASK
                out.append((s.tag - 1, s.key))
        return out

    def take_local(self):
        """(vni, mac, ip) of MACs newly seen sending from our TAP (ip: the address they sent
        from, 0 if none yet), since the last call; each is recorded so it is reported once,
        and once more when its first IPv4 and its first global IPv6 address show up (later
        addresses are not: a router or NAT behind the TAP would otherwise publish every
        address it forwards)."""
        out = [(self.local_new[i].vni, self.local_new[i].mac,
                0 if self.local_new[i].ip.hi == 0 and self.local_new[i].ip.lo == 0
                else addr_to_py(&self.local_new[i].ip))
               for i in range(self.n_local_new)]
        self.n_local_new = 0
        return out

    def local_forget(self, uint32_t vni, uint64_t mac):
        """Forget a local MAC (it left): seen again, it is reported again."""
        return hm_delete(&self.local, mac, vni + 1)

    cdef inline void note_local(self, uint32_t vni, const uint8_t* f, uint32_t n) noexcept nogil:
        """Learning on send: the source MAC (and IPv4 source, ARP sender address, or global
        IPv6 source) of a frame our TAP sent; new pairs are queued for the agent to publish."""
        cdef uint64_t mac = mac48(f + 6)
        cdef uint32_t ethertype = be16(f + 12), family = 0, known
        cdef Addr ip
        cdef Slot* s
        ip.hi = 0
        ip.lo = 0
        if mac == 0 or (f[6] & 1):
            return
        if ethertype == 0x0800 and n >= ETH_HLEN + 20:
            addr_v4(&ip, be32(f + 26))     # IPv4 source
            family = LOCAL_V4
        elif ethertype == 0x0806 and n >= ETH_HLEN + 28 and be16(f + 16) == 0x0800:
            addr_v4(&ip, be32(f + 28))     # ARP sender address
            family = LOCAL_V4
        elif ethertype == 0x86DD and n >= ETH_HLEN + 40 and (f[22] & 0xE0) == 0x20:
            addr_load6(&ip, f + 22)        # a global unicast IPv6 source (2000::/3)
            family = LOCAL_V6
        if family == LOCAL_V4 and ip.lo == V4_MAPPED:
            family = 0                     # 0.0.0.0: an ARP probe or DHCP, no address yet
            ip.lo = 0
        s = hm_find(&self.local, mac, vni + 1)
        known = s.value if s != NULL else 0
        if s != NULL and (family == 0 or known & family):
            return                      # known, and this family's address too (the first stays)
        if self.n_local_new == LEARN_RING:
            return                      # reported on a later frame
        with gil:
            hm_set(&self.local, mac, vni + 1, known | family | LOCAL_SEEN)
        self.local_new[self.n_local_new].vni = vni
        self.local_new[self.n_local_new].mac = mac
        self.local_new[self.n_local_new].ip = ip
        self.n_local_new += 1

    cdef inline void note_source(self, uint32_t vni, const uint8_t* frame, const Addr* ip,
                                 uint64_t h) noexcept nogil:
        """Learning on receive: mark a hit, or queue (vni, src MAC, ip) for fdb.py.
        ``h`` is hm_hash(src MAC, vni + 1), computed when the slot was prefetched."""
        cdef uint64_t mac = mac48(frame + 6)
        cdef Slot* s
        if mac == 0 or (frame[6] & 1):
            return                      # group or null source MACs are never learned
        s = hm_find_h(&self.fdb, mac, vni + 1, h)
        if s != NULL and addr_eq(&self.vteps[s.value & VTEP_MASK].ip, ip):
            s.value |= HIT
            return
        if self.n_learned and self.learned[self.n_learned - 1].mac == mac \
                and self.learned[self.n_learned - 1].vni == vni and addr_eq(&self.learned[self.n_learned - 1].ip, ip):
            return                      # a burst from one new MAC is queued once
        if self.n_learned == LEARN_RING:
            self.learn_overflow += 1
            return
        self.learned[self.n_learned].vni = vni
        self.learned[self.n_learned].mac = mac
        self.learned[self.n_learned].ip = ip[0]
        self.n_learned += 1

    # --- encrypted networks: sessions (overlay/core/sessions.py decides; these apply) ------

    def vni_encrypt(self, uint32_t vni, bint encrypted):
        """Seal every datagram of ``vni`` (and drop plaintext VXLAN for it), or stop."""
        cdef Net* net = self.net_of(vni)
        if net == NULL:
            raise KeyError(f"VNI {vni} is not served; vni_add it first")
        net.encrypted = encrypted

    def vni_encrypted(self, uint32_t vni):
        cdef Net* net = self.net_of(vni)
        return net != NULL and net.encrypted

    def tx_set(self, ip, uint16_t port, uint32_t index, const uint8_t[:] key, int cipher):
        """Seal what goes to VTEP (ip, port) with ``key`` (32 bytes) of ``cipher`` (seal.AES_256_GCM
        or seal.CHACHA20_POLY1305), ``index`` being the peer's receiver index; counters from 0."""
        cdef Addr a
        cdef uint32_t vid
        cdef Aead aead
        if key.shape[0] != 32 or cipher not in (CIPHER_AES_256_GCM, CIPHER_CHACHA20_POLY1305):
            raise ValueError("a session key is 32 bytes of cipher 1 (AES-256-GCM) or 2 (ChaCha20-Poly1305)")
        addr_from_py(ip, &a)
        vid = self.vtep_id(&a, port)
        if not aead_new(&aead, cipher, &key[0], True):
            raise MemoryError("OpenSSL refused the session key")
        aead_free(&self.vteps[vid].tx)
        self.vteps[vid].tx = aead
        self.vteps[vid].tx_index = index
        self.vteps[vid].tx_counter = 0

    def tx_clear(self, ip, uint16_t port):
        """VTEP (ip, port) has no session: its encrypted traffic is dropped (NO_SESSION) and wanted."""
        cdef Addr a
        cdef Slot* s
        addr_from_py(ip, &a)
        s = hm_find(&self.vtep_ids, addr_key(&a), <uint32_t>port + 1)
        if s == NULL or not aead_ready(&self.vteps[s.value].tx):
            return False
        aead_free(&self.vteps[s.value].tx)
        return True

    def tx_counters(self):
        """[(ip, port, receiver index, next counter)] of every VTEP with a session."""
        cdef uint32_t i
        return [(addr_to_py(&self.vteps[i].ip), self.vteps[i].port, self.vteps[i].tx_index,
                 self.vteps[i].tx_counter) for i in range(self.n_vteps) if aead_ready(&self.vteps[i].tx)]

    def rx_add(self, uint32_t index, ip, uint16_t port, const uint8_t[:] key, int cipher):
        """Open data datagrams with receiver index ``index`` from VTEP (ip, port) with ``key``."""
        cdef Addr a
        cdef uint32_t vid, i
        cdef Aead aead
        cdef RxSession* grown
        if key.shape[0] != 32 or cipher not in (CIPHER_AES_256_GCM, CIPHER_CHACHA20_POLY1305):
            raise ValueError("a session key is 32 bytes of cipher 1 (AES-256-GCM) or 2 (ChaCha20-Poly1305)")
        if hm_find(&self.rx_index, index, 1) != NULL:
            raise KeyError(f"receiver index {index} is in use")
        addr_from_py(ip, &a)
        vid = self.vtep_id(&a, port)
        if not aead_new(&aead, cipher, &key[0], False):
            raise MemoryError("OpenSSL refused the session key")
        for i in range(self.n_rxs):
            if not self.rxs[i].used:
                break
        else:
            if self.n_rxs == self.cap_rxs:
                grown = <RxSession*>realloc(self.rxs, max(16, self.cap_rxs * 2) * sizeof(RxSession))
                if grown == NULL:
                    aead_free(&aead)
                    raise MemoryError()
                self.rxs = grown
                self.cap_rxs = max(16, self.cap_rxs * 2)
            i = self.n_rxs
            self.n_rxs += 1
        memset(&self.rxs[i], 0, sizeof(RxSession))
        self.rxs[i].aead = aead
        self.rxs[i].index = index
        self.rxs[i].vtep = vid
        self.rxs[i].used = True
        hm_set(&self.rx_index, index, 1, i)

    def rx_remove(self, uint32_t index):
        """Stop opening datagrams of receiver index ``index``; True if it was there."""
        cdef Slot* s = hm_find(&self.rx_index, index, 1)
        cdef RxSession* r
        if s == NULL:
            return False
        r = &self.rxs[s.value]
        aead_free(&r.aead)
        r.used = False
        hm_delete(&self.rx_index, index, 1)
        return True

    def rx_stats(self):
        """[(receiver index, datagrams opened, their inner bytes)] of every session we open with."""
        cdef uint32_t i
        return [(self.rxs[i].index, self.rxs[i].packets, self.rxs[i].nbytes)
                for i in range(self.n_rxs) if self.rxs[i].used]

    def take_wanted(self):
        """[(ip, port)] of VTEPs that encrypted traffic was dropped for (NO_SESSION) since the
        last call: each once, until it is taken."""
        cdef uint32_t i, vid
        out = []
        for i in range(self.n_wanted):
            vid = self.wanted[i]
            self.vteps[vid].wanted = False
            out.append(self.vtep(vid))
        self.n_wanted = 0
        return out

    def take_confirmed(self):
        """Receiver indexes whose first authenticated datagram arrived since the last call."""
        out = [self.confirmed[i] for i in range(self.n_confirmed)]
        self.n_confirmed = 0
        return out

    def take_stale(self):
        """Source addresses of data datagrams with a receiver index we do not have (counted as
        AUTH_FAILED) since the last call: a peer that still seals with a session we lost (this
        agent restarted); the control plane starts a handshake if the address is a peer's."""
        out = [addr_to_py(&self.stale[i]) for i in range(self.n_stale)]
        self.n_stale = 0
        return out

    def take_handshakes(self):
        """[(message bytes, source address int)] of handshake messages received since the last
        call (at most 64: more are dropped as HANDSHAKE_LIMITED)."""
        out = [((<char*>self.handshakes[i].data)[:self.handshakes[i].length], addr_to_py(&self.handshakes[i].ip))
               for i in range(self.n_handshakes)]
        self.n_handshakes = 0
        return out

    cdef inline bint want(self, uint32_t vid) noexcept nogil:
        """Drop for lack of a session: counted, and the VTEP queued for a handshake."""
        self.drop_counts[DROP_NO_SESSION] += 1
        if not self.vteps[vid].wanted and self.n_wanted < LEARN_RING:
            self.vteps[vid].wanted = True
            self.wanted[self.n_wanted] = vid
            self.n_wanted += 1
        return False

    cdef inline bint can_seal(self, uint32_t vid) noexcept nogil:
        cdef CVtep* v = &self.vteps[vid]
        return aead_ready(&v.tx) and v.tx_counter < REJECT_AFTER_MESSAGES

    cdef inline bint seal_for(self, uint32_t vid, uint8_t* p, Py_ssize_t n) noexcept nogil:
        """Seal the n-byte VXLAN datagram at p + 16 for VTEP vid (can_seal checked)."""
        cdef CVtep* v = &self.vteps[vid]
        v.tx_counter += 1
        return seal_in_place(&v.tx, v.tx_index, v.tx_counter - 1, p, n)

    cdef int open_datagram(self, uint8_t* p, Py_ssize_t n, const Addr* src) noexcept nogil:
        """seal.open_datagram on the n-byte data datagram at p, plus: the session's peer must be
        the outer source (NOT_MEMBER otherwise). OK leaves the VXLAN datagram at p + 16."""
        cdef Slot* s
        cdef RxSession* r
        if n < SEAL_OVERHEAD:
            return DROP_TOO_SHORT
        s = hm_find(&self.rx_index, le32(p + 4), 1)
        if s == NULL:       # the sender thinks it has a session with us: it may have outlived ours
            if self.n_stale < LEARN_RING and (self.n_stale == 0 or not addr_eq(&self.stale[self.n_stale - 1], src)):
                self.stale[self.n_stale] = src[0]
                self.n_stale += 1
            return DROP_AUTH_FAILED
        r = &self.rxs[s.value]
        if not open_in_place(&r.aead, p, n):
            return DROP_AUTH_FAILED
        if not addr_eq(&self.vteps[r.vtep].ip, src):
            return DROP_NOT_MEMBER              # before the window: a copy from elsewhere burns no counter
        if not replay_accept(r, le64(p + 8)):
            return DROP_REPLAYED
        r.packets += 1
        if n > SEAL_OVERHEAD + VXLAN_HLEN:      # keepalives carry nothing
            r.nbytes += n - SEAL_OVERHEAD - VXLAN_HLEN
        if not r.confirmed and self.n_confirmed < LEARN_RING:
            r.confirmed = True
            self.confirmed[self.n_confirmed] = r.index
            self.n_confirmed += 1
        return OK

    cdef inline void punt_handshake(self, const uint8_t* p, Py_ssize_t n, const Addr* src) noexcept nogil:
        """Queue a handshake message for Python (take_handshakes), or count it if the queue is full."""
        if n > HS_MAX or self.n_handshakes == HS_RING:
            self.drop_counts[DROP_HANDSHAKE_LIMITED] += 1
            return
        memcpy(self.handshakes[self.n_handshakes].data, p, n)
        self.handshakes[self.n_handshakes].length = <uint32_t>n
        self.handshakes[self.n_handshakes].ip = src[0]
        self.n_handshakes += 1

    def seal_keepalive(self, ip, uint16_t port):
        """A data datagram with nothing in it, sealed for VTEP (ip, port) on its session (the
        initiator's first message confirms a new session to the responder); None without one."""
        cdef Addr a
        cdef Slot* s
        cdef uint8_t buf[SEAL_OVERHEAD]
        addr_from_py(ip, &a)
        s = hm_find(&self.vtep_ids, addr_key(&a), <uint32_t>port + 1)
        if s == NULL or not self.can_seal(s.value):
            return None
        if not self.seal_for(s.value, buf, 0):
            return None
        return (<char*>buf)[:SEAL_OVERHEAD]
