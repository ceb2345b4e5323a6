# ---- io.pxi: the pumps: TAP -> offloads -> encap -> sendmmsg, and recvmmsg -> decap -> TAP ----
#
# One call drains a file descriptor in batches (up to ``budget`` frames, so one direction
# cannot starve the other: the event loop calls again while the fd stays readable) with the GIL
# released and no Python object per frame.
#
# Sending uses a raw IPv4 socket (IPPROTO_UDP): the kernel writes the outer IP header (source =
# the socket's bound address, DF set by IP_PMTUDISC_DO) and we write the 8-byte UDP header,
# which is how every flow gets its own source port (RFC 7348 section 5) while receiving stays on
# the ordinary UDP socket bound to the VXLAN port. A datagram is two iovecs: that UDP header
# (one per output, since a flooded frame goes to VTEPs that may listen on different ports) and
# the VXLAN header + frame, shared by all replicas.

cdef Py_ssize_t read_tap(FrameBatch b, int fd) noexcept nogil:
    """TAP reads into slots 0.. until EAGAIN or the batch is full; return how many. Each slot
    gets the virtio-net header and the frame, length[i] bytes from frame_ptr(i)."""
    cdef Py_ssize_t n = 0
    cdef ssize_t r
    while n < b.slots:
        r = c_read(fd, b.frame_ptr(n), b.max_frame_c)
        if r < 0:
            if errno == EINTR:
                continue
            break                # EAGAIN: drained (other errors: the loop will tell)
        b.length[n] = <uint32_t>r
        n += 1
    return n


cdef void send_outputs(ForwardingCore core, FrameBatch b, int fd) noexcept nogil:
    """sendmmsg every output of the last encap; count what the kernel refused."""
    cdef Py_ssize_t j, k = 0
    cdef int sent
    cdef CVtep* v
    cdef uint8_t* h
    cdef uint32_t flen, dlen
    cdef IoArrays* io = &b.tx
    for j in range(b.n_out):
        v = &core.vteps[b.out_vtep[j]]
        flen = b.length[b.out_slot[j]]
        dlen = UDP_HLEN + VXLAN_HLEN + flen
        h = io.udp_hdrs + j * UDP_HLEN
        h[0] = b.out_sport[j] >> 8
        h[1] = b.out_sport[j] & 0xFF
        h[2] = v.port >> 8
        h[3] = v.port & 0xFF
        h[4] = dlen >> 8
        h[5] = dlen & 0xFF
        h[6] = 0                  # UDP checksum 0: allowed for IPv4 (RFC 7348 section 5)
        h[7] = 0
        io.iovs[2 * j].iov_base = h
        io.iovs[2 * j].iov_len = UDP_HLEN
        io.iovs[2 * j + 1].iov_base = b.frame_ptr(b.out_slot[j]) - VXLAN_HLEN
        io.iovs[2 * j + 1].iov_len = VXLAN_HLEN + flen
        io.addrs[j].sin_family = AF_INET
        io.addrs[j].sin_port = 0
        io.addrs[j].sin_addr.s_addr = htonl(v.ip)
        io.msgs[j].msg_hdr.msg_name = &io.addrs[j]
        io.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        io.msgs[j].msg_hdr.msg_iov = &io.iovs[2 * j]
        io.msgs[j].msg_hdr.msg_iovlen = 2
    while k < b.n_out:
        sent = sendmmsg(fd, &io.msgs[k], b.n_out - k, 0)
        if sent < 0:
            if errno == EINTR:
                continue
            # The first remaining datagram failed: count it and go on with the rest.
            core.drop_counts[DROP_TOO_BIG if errno == EMSGSIZE else DROP_TX_ERROR] += 1
            k += 1
            continue
        for j in range(k, k + sent):
            v = &core.vteps[b.out_vtep[j]]
            v.tx_frames += 1
            v.tx_bytes += b.length[b.out_slot[j]]
        k += sent


cdef void encap_and_send(ForwardingCore core, FrameBatch b, uint32_t vni, Py_ssize_t n,
                         int raw_fd) noexcept nogil:
    cdef Py_ssize_t start = 0
    while start < n:
        start = encap_batch(core, b, vni, start, n)
        send_outputs(core, b, raw_fd)


cdef Py_ssize_t pump_tap_to_udp(ForwardingCore core, FrameBatch reads, FrameBatch frames,
                                uint32_t vni, int tap_fd, int raw_fd, Py_ssize_t budget) noexcept nogil:
    cdef Py_ssize_t n, i, used, total = 0
    cdef int st
    while total < budget:
        n = read_tap(reads, tap_fd)
        if n == 0:
            break
        used = 0
        for i in range(n):
            st = prepare_frame(reads.frame_ptr(i), reads.length[i], frames, &used)
            if st == DROP_OUT_OF_ROOM and used > 0:     # frames is full: send it, then retry
                encap_and_send(core, frames, vni, used, raw_fd)
                used = 0
                st = prepare_frame(reads.frame_ptr(i), reads.length[i], frames, &used)
            if st != OK:
                core.drop_counts[st] += 1
        encap_and_send(core, frames, vni, used, raw_fd)
        total += n
        if n < reads.slots:
            break                # the TAP is drained
    return total


cdef Py_ssize_t recv_udp(FrameBatch b, int fd) noexcept nogil:
    """recvmmsg into slots 0.. (each at HEADROOM - 8); fill dgram_len and src_ip."""
    cdef Py_ssize_t i
    cdef int r
    cdef IoArrays* io = &b.rx
    for i in range(b.slots):
        io.iovs[i].iov_base = b.frame_ptr(i) - VXLAN_HLEN
        io.iovs[i].iov_len = b.max_frame_c + VXLAN_HLEN
        io.msgs[i].msg_hdr.msg_name = &io.addrs[i]
        io.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        io.msgs[i].msg_hdr.msg_iov = &io.iovs[i]
        io.msgs[i].msg_hdr.msg_iovlen = 1
        io.msgs[i].msg_hdr.msg_flags = 0
    while True:
        r = recvmmsg(fd, io.msgs, b.slots, MSG_DONTWAIT, NULL)
        if r < 0 and errno == EINTR:
            continue
        break
    if r <= 0:
        return 0
    for i in range(r):
        b.dgram_len[i] = io.msgs[i].msg_len
        b.src_ip[i] = ntohl(io.addrs[i].sin_addr.s_addr)
        b.truncated[i] = (io.msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0
    return r


cdef void write_plain(ForwardingCore core, FrameBatch b, Py_ssize_t i, int tap_fd) noexcept nogil:
    """Write slot i's frame behind an all-zero virtio-net header, in the bytes the VXLAN
    header (and two before it) held."""
    memset(b.frame_ptr(i) - VNET_HLEN, 0, VNET_HLEN)
    if c_write(tap_fd, b.frame_ptr(i) - VNET_HLEN, b.length[i] + VNET_HLEN) < 0:
        core.drop_counts[DROP_TAP_WRITE] += 1


cdef void write_run(ForwardingCore core, FrameBatch b, const Py_ssize_t* run, Py_ssize_t count,
                    const Seg* head, const Seg* last, FrameBatch merge, int tap_fd) noexcept nogil:
    cdef Py_ssize_t n
    if count == 1:
        write_plain(core, b, run[0], tap_fd)
        return
    n = merge_run(b, run, count, head, last, merge.frame_ptr(0))
    if c_write(tap_fd, merge.frame_ptr(0) - VNET_HLEN, n + VNET_HLEN) < 0:
        core.drop_counts[DROP_TAP_WRITE] += count
    core.coalesced += count


cdef void write_tap(ForwardingCore core, FrameBatch b, Py_ssize_t n, FrameBatch merge,
                    int tap_fd) noexcept nogil:
    """The passing frames of a decapsulated batch to the TAP, in order, runs of one TCP
    stream's segments coalesced into super-frames (offload.coalesce)."""
    cdef Py_ssize_t i, count = 0, total = 0
    cdef Py_ssize_t run[MAX_RUN]
    cdef Seg head, last, s
    cdef bint seg
    for i in range(n):
        if b.status[i] != OK:
            continue
        seg = tcp_segment(b.frame_ptr(i), b.length[i], &s)
        if count and seg and joins(b.frame_ptr(run[0]), &head, &last, total, count, b.frame_ptr(i), &s):
            run[count] = i
            count += 1
            last = s
            total += s.payload
            continue
        if count:
            write_run(core, b, run, count, &head, &last, merge, tap_fd)
            count = 0
        if seg:
            run[0] = i
            count = 1
            head = s
            last = s
            total = s.payload
        else:
            write_plain(core, b, i, tap_fd)
    if count:
        write_run(core, b, run, count, &head, &last, merge, tap_fd)


cdef Py_ssize_t pump_udp_to_tap(ForwardingCore core, FrameBatch b, FrameBatch merge, int udp_fd,
                                int tap_fd, Py_ssize_t budget) noexcept nogil:
    cdef Py_ssize_t n, total = 0
    while total < budget:
        n = recv_udp(b, udp_fd)
        if n == 0:
            break
        decap_batch(core, b, n)
        write_tap(core, b, n, merge, tap_fd)
        total += n
        if n < b.slots:
            break                          # the socket is drained
    return total
