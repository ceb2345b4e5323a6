# ---- hashmap.pxi: one open-addressing hash table, used for every lookup in the fast path ----
#
# Key: a 64-bit word plus a 32-bit tag (0 marks an empty slot, so callers store tag >= 1).
#   forwarding table: key = MAC (48 bits), tag = VNI + 1
#   VNI table:        key = VNI,           tag = 1
#   VTEP table:       key = IPv4 << 16 | port, tag = 1
# Linear probing, load factor <= 1/4 (probe runs stay short, so a lookup in a 1M-entry table
# costs about what it does in a small one; 16-byte slots, so 64 MiB for 1M entries), deletion by
# backward shift (no tombstones, so lookups stay short however many deletes there were).

cdef struct Slot:
    uint64_t key
    uint32_t tag
    uint32_t value

cdef struct HashMap:
    Slot* slots
    uint64_t mask       # capacity - 1; capacity is a power of two
    uint64_t count


cdef inline uint64_t hm_hash(uint64_t key, uint32_t tag) noexcept nogil:
    """splitmix64's finaliser: every key bit reaches every slot-index bit."""
    cdef uint64_t x = key ^ (<uint64_t>tag * <uint64_t>0x9E3779B97F4A7C15)
    x = (x ^ (x >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * <uint64_t>0x94D049BB133111EB
    return x ^ (x >> 31)


cdef enum:
    HUGE_PAGE = 2 * 1024 * 1024


cdef int hm_init(HashMap* m, uint64_t capacity) except -1:
    """An empty table with room for ``capacity`` entries at load 1/4. Tables of 2 MiB and more
    ask for transparent huge pages: random lookups in a 1M-entry table otherwise spend as
    much time in TLB misses as in cache misses."""
    cdef uint64_t cap = 16
    cdef size_t size
    while cap < capacity * 4:
        cap <<= 1
    size = cap * sizeof(Slot)
    if size >= HUGE_PAGE:
        m.slots = <Slot*>aligned_alloc(HUGE_PAGE, size)
        if m.slots != NULL:
            madvise(m.slots, size, MADV_HUGEPAGE)   # advice only: failure is harmless
            memset(m.slots, 0, size)
    else:
        m.slots = <Slot*>calloc(cap, sizeof(Slot))
    if m.slots == NULL:
        raise MemoryError()
    m.mask = cap - 1
    m.count = 0
    return 0


cdef void hm_free(HashMap* m) noexcept:
    free(m.slots)
    m.slots = NULL


cdef inline void hm_prefetch(const HashMap* m, uint64_t h) noexcept nogil:
    __builtin_prefetch(&m.slots[h & m.mask])


cdef inline Slot* hm_find_h(const HashMap* m, uint64_t key, uint32_t tag, uint64_t h) noexcept nogil:
    """The slot holding (key, tag), or NULL. ``h`` is hm_hash(key, tag)."""
    cdef uint64_t i = h & m.mask
    cdef Slot* s
    while True:
        s = &m.slots[i]
        if s.tag == 0:
            return NULL
        if s.tag == tag and s.key == key:
            return s
        i = (i + 1) & m.mask


cdef inline Slot* hm_find(const HashMap* m, uint64_t key, uint32_t tag) noexcept nogil:
    return hm_find_h(m, key, tag, hm_hash(key, tag))


cdef int hm_grow(HashMap* m) except -1:
    cdef HashMap bigger
    cdef uint64_t i
    cdef Slot* s
    hm_init(&bigger, (m.mask + 1) // 2)   # twice the slots: (mask+1)/2 entries at load 1/4
    for i in range(m.mask + 1):
        if m.slots[i].tag != 0:
            s = hm_slot_for_insert(&bigger, m.slots[i].key, m.slots[i].tag)
            s.key = m.slots[i].key
            s.tag = m.slots[i].tag
            s.value = m.slots[i].value
            bigger.count += 1
    free(m.slots)
    m[0] = bigger
    return 0


cdef inline Slot* hm_slot_for_insert(HashMap* m, uint64_t key, uint32_t tag) noexcept nogil:
    """The slot of (key, tag) if present, else the empty slot where it goes."""
    cdef uint64_t i = hm_hash(key, tag) & m.mask
    cdef Slot* s
    while True:
        s = &m.slots[i]
        if s.tag == 0 or (s.tag == tag and s.key == key):
            return s
        i = (i + 1) & m.mask


cdef int hm_set(HashMap* m, uint64_t key, uint32_t tag, uint32_t value) except -1:
    """Insert or replace; grows the table to keep the load factor at or below 1/4."""
    cdef Slot* s
    if (m.count + 1) * 4 > m.mask + 1:
        hm_grow(m)
    s = hm_slot_for_insert(m, key, tag)
    if s.tag == 0:
        s.key = key
        s.tag = tag
        m.count += 1
    s.value = value
    return 0


cdef bint hm_delete(HashMap* m, uint64_t key, uint32_t tag) noexcept nogil:
    """Remove (key, tag); shift later members of its probe run back. True if it was there."""
    cdef Slot* s = hm_find(m, key, tag)
    cdef uint64_t hole, j, home
    if s == NULL:
        return False
    hole = s - m.slots
    j = hole
    while True:
        j = (j + 1) & m.mask
        if m.slots[j].tag == 0:
            break
        home = hm_hash(m.slots[j].key, m.slots[j].tag) & m.mask
        # Move slot j into the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
            m.slots[hole] = m.slots[j]
            hole = j
    m.slots[hole].tag = 0
    m.slots[hole].key = 0
    m.slots[hole].value = 0
    m.count -= 1
    return True
