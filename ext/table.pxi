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

cdef struct CVtep:
    uint32_t ip          # IPv4, host byte order
    uint16_t port
    uint64_t rx_frames, rx_bytes, tx_frames, tx_bytes   # inner frames and their bytes

cdef struct Net:
    uint32_t vni
    uint32_t nflood
    uint32_t* flood      # VTEP ids that get broadcast, multicast and unknown unicast
    int tap_fd           # where its received frames go; -1: the pump's tap_fd
    bint used

cdef struct Learned:
    uint32_t vni
    uint64_t mac
    uint32_t ip


cdef class ForwardingCore:
    """The C tables behind the fast path. Keys: VNI (0..2^24-1), MAC (48-bit int), IPv4 as int.

    One thread owns a core and its batches: the batch calls release the GIL and hold pointers
    into these tables, so changing them from another thread meanwhile is not allowed (the
    agent is single-threaded: table changes and pumps run on its one event loop)."""

    cdef HashMap fdb          # (mac, vni + 1) -> VTEP id | HIT
    cdef HashMap vni_index    # (vni, 1) -> index into nets
    cdef HashMap vtep_ids     # (ip << 16 | port, 1) -> VTEP id
    cdef HashMap members      # (ip, vni + 1) -> VTEP id, for every VTEP on a VNI's flood list
    cdef HashMap neigh        # (IPv4, vni + 1) -> index into neigh_macs: ARP suppression
    cdef uint64_t* neigh_macs
    cdef uint32_t n_neigh_macs, cap_neigh_macs
    cdef uint32_t* neigh_free  # indexes of neigh_macs free for reuse
    cdef uint32_t n_neigh_free
    cdef readonly uint64_t arp_suppressed   # ARP requests answered from the registry
    cdef HashMap local        # (mac, vni + 1) -> IPv4 seen with it: MACs behind our own TAP
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

    def __cinit__(self, Py_ssize_t capacity=1024, bint allow_vlan=False, bint source_check=False):
        if not 0 <= capacity <= (1 << 28):
            raise ValueError(f"capacity must be 0 to {1 << 28} entries, got {capacity}")
        hm_init(&self.fdb, max(capacity, 16))
        hm_init(&self.vni_index, 16)
        hm_init(&self.vtep_ids, 16)
        hm_init(&self.members, 16)
        hm_init(&self.neigh, 16)
        hm_init(&self.local, 16)
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
        free(self.neigh_macs)
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
        if net == NULL:
            raise KeyError(f"VNI {vni} is not served; vni_add it first")
        ids = [self.vtep_id(ip, port) for ip, port in vteps]
        flood = <uint32_t*>malloc(max(len(ids), 1) * sizeof(uint32_t))
        if flood == NULL:
            raise MemoryError()
        for i in range(len(ids)):
            flood[i] = ids[i]
        net = self.net_of(vni)   # vtep_id never moves nets, but stay obviously safe
        for i in range(net.nflood):
            hm_delete(&self.members, self.vteps[net.flood[i]].ip, vni + 1)
        free(net.flood)
        net.flood = flood
        net.nflood = len(ids)
        for i in range(net.nflood):
            hm_set(&self.members, self.vteps[flood[i]].ip, vni + 1, flood[i])

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

    cdef uint32_t vtep_id(self, uint32_t ip, uint16_t port) except? 0xFFFFFFFF:
        cdef uint64_t key = (<uint64_t>ip << 16) | port
        cdef Slot* s = hm_find(&self.vtep_ids, key, 1)
        cdef CVtep* grown
        if s != NULL:
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
        self.vteps[self.n_vteps].ip = ip
        self.vteps[self.n_vteps].port = port
        hm_set(&self.vtep_ids, key, 1, self.n_vteps)
        self.n_vteps += 1
        return self.n_vteps - 1

    def vtep(self, uint32_t vtep_id):
        """(ip, port) of an interned VTEP id."""
        if vtep_id >= self.n_vteps:
            raise IndexError(f"no VTEP id {vtep_id}")
        return (self.vteps[vtep_id].ip, self.vteps[vtep_id].port)

    # --- FDB ------------------------------------------------------------------------------

    def fdb_set(self, uint32_t vni, uint64_t mac, uint32_t ip, uint16_t port):
        """(vni, mac) -> VTEP (ip, port). Insert or replace."""
        if vni > 0xFFFFFF or mac >> 48:
            raise ValueError("VNI must fit 24 bits and MAC 48 bits")
        hm_set(&self.fdb, mac, vni + 1, self.vtep_id(ip, port))

    def fdb_delete(self, uint32_t vni, uint64_t mac):
        """Remove (vni, mac); True if it was there."""
        return hm_delete(&self.fdb, mac, vni + 1)

    def fdb_get(self, uint32_t vni, uint64_t mac):
        """(ip, port) for (vni, mac), or None."""
        cdef Slot* s = hm_find(&self.fdb, mac, vni + 1)
        return None if s == NULL else self.vtep(s.value & VTEP_MASK)

    def fdb_load(self, uint32_t vni, macs, uint32_t ip, uint16_t port):
        """Bulk fdb_set of many MACs to one VTEP (benchmarks and resyncs)."""
        cdef uint32_t vid
        cdef uint64_t mac
        if vni > 0xFFFFFF:
            raise ValueError("VNI must fit 24 bits")
        vid = self.vtep_id(ip, port)
        for mac in macs:
            if mac >> 48:
                raise ValueError("MAC must fit 48 bits")
            hm_set(&self.fdb, mac, vni + 1, vid)

    def __len__(self):
        return self.fdb.count

    # --- neighbours (ARP suppression) -----------------------------------------------------

    def neigh_set(self, uint32_t vni, uint32_t ip, uint64_t mac):
        """ARP requests on ``vni`` for IPv4 ``ip`` (an int) are answered with ``mac``."""
        cdef Slot* s = hm_find(&self.neigh, ip, vni + 1)
        cdef uint32_t i
        if vni > 0xFFFFFF or mac >> 48:
            raise ValueError("VNI must fit 24 bits and MAC 48 bits")
        if s != NULL:
            self.neigh_macs[s.value] = mac
            return
        if self.n_neigh_free:
            self.n_neigh_free -= 1
            i = self.neigh_free[self.n_neigh_free]
        else:
            if self.n_neigh_macs == self.cap_neigh_macs:
                self.cap_neigh_macs = max(16, self.cap_neigh_macs * 2)
                self.neigh_macs = <uint64_t*>realloc(self.neigh_macs, self.cap_neigh_macs * sizeof(uint64_t))
                self.neigh_free = <uint32_t*>realloc(self.neigh_free, self.cap_neigh_macs * sizeof(uint32_t))
                if self.neigh_macs == NULL or self.neigh_free == NULL:
                    raise MemoryError()
            i = self.n_neigh_macs
            self.n_neigh_macs += 1
        self.neigh_macs[i] = mac
        hm_set(&self.neigh, ip, vni + 1, i)

    def neigh_delete(self, uint32_t vni, uint32_t ip):
        cdef Slot* s = hm_find(&self.neigh, ip, vni + 1)
        if s == NULL:
            return False
        self.neigh_free[self.n_neigh_free] = s.value
        self.n_neigh_free += 1
        hm_delete(&self.neigh, ip, vni + 1)
        return True

    cdef inline bint neigh_lookup(self, uint32_t vni, uint32_t ip, uint64_t* mac) noexcept nogil:
        cdef Slot* s = hm_find(&self.neigh, ip, vni + 1)
        if s == NULL:
            return False
        mac[0] = self.neigh_macs[s.value]
        return True

    # --- what the data path saw -----------------------------------------------------------

    def vtep_stats(self):
        """[(ip, port, rx_frames, rx_bytes, tx_frames, tx_bytes)] for every VTEP ever used."""
        return [(v.ip, v.port, v.rx_frames, v.rx_bytes, v.tx_frames, v.tx_bytes)
                for v in self.vteps[:self.n_vteps]]

    cdef inline CVtep* member(self, uint32_t ip, uint32_t vni) noexcept nogil:
        """The VTEP at ``ip`` on the flood list of ``vni``, or NULL."""
        cdef Slot* s = hm_find(&self.members, ip, vni + 1)
        return NULL if s == NULL else &self.vteps[s.value]

    def drops(self):
        """Drop counts indexed by overlay.wire.Drop value (index 0 unused)."""
        return [self.drop_counts[i] for i in range(N_DROP_REASONS)]

    def take_learned(self):
        """(vni, mac, ip) of source MACs seen from a VTEP the table does not have them at,
        since the last call; for fdb.ForwardingTable.learn. At most LEARN_RING per call."""
        out = [(self.learned[i].vni, self.learned[i].mac, self.learned[i].ip)
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
        """(vni, mac, ip) of MACs newly seen sending from our TAP (ip: the IPv4 address they
        sent from, 0 if none yet), since the last call; each is recorded so it is reported once,
        and once more when its first IPv4 address shows up (later addresses are not: a router
        or NAT behind the TAP would otherwise publish every address it forwards)."""
        out = [(self.local_new[i].vni, self.local_new[i].mac, self.local_new[i].ip)
               for i in range(self.n_local_new)]
        self.n_local_new = 0
        return out

    def local_forget(self, uint32_t vni, uint64_t mac):
        """Forget a local MAC (it left): seen again, it is reported again."""
        return hm_delete(&self.local, mac, vni + 1)

    cdef inline void note_local(self, uint32_t vni, const uint8_t* f, uint32_t n) noexcept nogil:
        """Learning on send: the source MAC (and IPv4 source, or ARP sender address) of a frame
        our TAP sent; new pairs are queued for the agent to publish."""
        cdef uint64_t mac = mac48(f + 6)
        cdef uint32_t ip = 0, ethertype = be16(f + 12)
        cdef Slot* s
        if mac == 0 or (f[6] & 1):
            return
        if ethertype == 0x0800 and n >= ETH_HLEN + 20:
            ip = be32(f + 26)              # IPv4 source
        elif ethertype == 0x0806 and n >= ETH_HLEN + 28 and be16(f + 16) == 0x0800:
            ip = be32(f + 28)              # ARP sender address
        s = hm_find(&self.local, mac, vni + 1)
        if s != NULL and (ip == 0 or s.value != 0):
            return                      # known, and its address too (the first one seen stays)
        if self.n_local_new == LEARN_RING:
            return                      # reported on a later frame
        with gil:
            hm_set(&self.local, mac, vni + 1, ip if ip else (s.value if s != NULL else 0))
        self.local_new[self.n_local_new].vni = vni
        self.local_new[self.n_local_new].mac = mac
        self.local_new[self.n_local_new].ip = ip
        self.n_local_new += 1

    cdef inline void note_source(self, uint32_t vni, const uint8_t* frame, uint32_t ip,
                                 uint64_t h) noexcept nogil:
        """Learning on receive: mark a hit, or queue (vni, src MAC, ip) for fdb.py.
        ``h`` is hm_hash(src MAC, vni + 1), computed when the slot was prefetched."""
        cdef uint64_t mac = mac48(frame + 6)
        cdef Slot* s
        if mac == 0 or (frame[6] & 1):
            return                      # group or null source MACs are never learned
        s = hm_find_h(&self.fdb, mac, vni + 1, h)
        if s != NULL and self.vteps[s.value & VTEP_MASK].ip == ip:
            s.value |= HIT
            return
        if self.n_learned and self.learned[self.n_learned - 1].mac == mac \
                and self.learned[self.n_learned - 1].vni == vni and self.learned[self.n_learned - 1].ip == ip:
            return                      # a burst from one new MAC is queued once
        if self.n_learned == LEARN_RING:
            self.learn_overflow += 1
            return
        self.learned[self.n_learned].vni = vni
        self.learned[self.n_learned].mac = mac
        self.learned[self.n_learned].ip = ip
        self.n_learned += 1
