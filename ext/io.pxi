# ---- io.pxi: the pumps: TAP -> offloads -> encap -> sendmmsg, and recvmmsg -> decap -> TAP ----
#
# One call drains a file descriptor in batches (up to ``budget`` TAP reads or datagrams, so
# one direction cannot starve the other: the event loop calls again while the fd stays
# readable) with the GIL released and no Python object per frame.
#
# Both directions move many datagrams per trip through the kernel's UDP stack:
# - send: consecutive datagrams to one VTEP of one size (the segments of a TCP super-frame, a
#   burst of same-size frames) go as one message with UDP_SEGMENT (UDP GSO), which the kernel
#   cuts into datagrams as late as it can; each message is sent from the socket of a small
#   pool that the inner flow hashes to, so flows keep distinct, stable UDP source ports
#   (RFC 7348 section 5) while the socket layer does the work;
# - receive: the socket has UDP_GRO, so the kernel hands over consecutive datagrams of one
#   flow as one message with their size; ``split_datagrams`` puts each in its own slot.

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
            if errno != EAGAIN:
                b.io_error = errno   # the TAP is gone or broken: the agent must hear of it
            break
        b.length[n] = <uint32_t>r
        n += 1
    return n


cdef enum:
    MAX_GSO_SEGMENTS = 64       # the kernel's UDP_MAX_SEGMENTS
    MAX_GSO_BYTES = 60000       # and a message stays below 64 KiB of UDP payload


cdef struct Senders:
    int fds4[64]         # sockets bound to the IPv4 local address: datagrams to IPv4 VTEPs
    int n4
    int fds6[64]         # bound to the IPv6 local address: to IPv6 VTEPs
    int n6


cdef inline int sender_of(uint16_t sport, const CVtep* v, const Senders* fds) noexcept nogil:
    """The socket a flow to ``v`` is sent from: the VTEP's family, the flow hash's pick of the
    pool; -1 when this host has no socket of that family."""
    if addr_is4(&v.ip):
        return fds.fds4[sport % fds.n4] if fds.n4 else -1
    return fds.fds6[sport % fds.n6] if fds.n6 else -1


cdef int senders_from(object send_fds, object send_fds6, Senders* out) except -1:
    cdef int k
    out.n4 = len(send_fds)
    out.n6 = len(send_fds6)
    if out.n4 > 64 or out.n6 > 64 or out.n4 + out.n6 == 0:
        raise ValueError("send_fds, send_fds6: 0 to 64 sockets each, at least one in all")
    for k in range(out.n4):
        out.fds4[k] = send_fds[k]
    for k in range(out.n6):
        out.fds6[k] = send_fds6[k]
    return 0


cdef void flush_messages(ForwardingCore core, FrameBatch b, Py_ssize_t first, Py_ssize_t n_msgs,
                         int fd) noexcept nogil:
    """sendmmsg messages first..first+n_msgs-1 on ``fd``; count what went and what failed."""
    cdef IoArrays* io = &b.tx
    cdef Py_ssize_t k = first, end = first + n_msgs, j
    cdef int sent
    cdef uint32_t segs
    cdef CVtep* v
    if fd < 0:                  # no socket of the VTEP's family (the control plane never
        for j in range(first, end):   # places such a VTEP; counted if it happens)
            core.drop_counts[DROP_TX_ERROR] += io.msgs[j].msg_hdr.msg_iovlen
        return
    while k < end:
        sent = sendmmsg(fd, &io.msgs[k], end - k, 0)
        if sent < 0:
            if errno == EINTR:
                continue
            # The first remaining message failed: count its datagrams and go on with the rest.
            segs = io.msgs[k].msg_hdr.msg_iovlen
            if errno == EMSGSIZE or (errno == EINVAL and segs > 1):
                core.drop_counts[DROP_TOO_BIG] += segs   # larger than the path MTU (DF is set)
            else:
                core.drop_counts[DROP_TX_ERROR] += segs
            k += 1
            continue
        for j in range(k, k + sent):
            v = &core.vteps[b.msg_vtep[j]]
            v.tx_frames += io.msgs[j].msg_hdr.msg_iovlen
            v.tx_bytes += b.msg_bytes[j]
        k += sent


cdef void send_outputs(ForwardingCore core, FrameBatch b, const Senders* fds) noexcept nogil:
    """Send every output of the last encap: consecutive outputs to one VTEP from one socket
    with one datagram size (the last may be shorter) become one UDP_SEGMENT message."""
    cdef IoArrays* io = &b.tx
    cdef Py_ssize_t j = 0, m = 0, first = 0, iov = 0
    cdef uint32_t size, dlen, count, total
    cdef int fd, fd_prev = -2
    cdef CVtep* v
    cdef cmsghdr* c
    cdef sockaddr_in* sin
    while j < b.n_out:
        v = &core.vteps[b.out_vtep[j]]
        fd = sender_of(b.out_sport[j], v, fds)
        if fd != fd_prev and m > first:
            flush_messages(core, b, first, m - first, fd_prev)
            first = m
        fd_prev = fd
        size = b.out_len[j]
        io.msgs[m].msg_hdr.msg_iov = &io.iovs[iov]
        count = 0
        total = 0
        b.msg_bytes[m] = 0
        while True:      # gather this message's datagrams
            dlen = b.out_len[j]
            io.iovs[iov].iov_base = b.out_ptr[j]
            io.iovs[iov].iov_len = dlen
            iov += 1
            count += 1
            total += dlen
            b.msg_bytes[m] += b.length[b.out_slot[j]]
            j += 1
            if dlen < size or j == b.n_out or count == MAX_GSO_SEGMENTS \
                    or b.out_vtep[j] != b.out_vtep[j - 1] \
                    or sender_of(b.out_sport[j], &core.vteps[b.out_vtep[j]], fds) != fd \
                    or b.out_len[j] > size \
                    or total + size > MAX_GSO_BYTES:
                break
        if addr_is4(&v.ip):
            sin = <sockaddr_in*>&io.addrs[m]
            sin.sin_family = AF_INET
            sin.sin_port = htons(v.port)
            sin.sin_addr.s_addr = htonl(<uint32_t>(v.ip.lo & 0xFFFFFFFFu))
            io.msgs[m].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        else:
            memset(&io.addrs[m], 0, sizeof(sockaddr_in6))
            io.addrs[m].sin6_family = AF_INET6
            io.addrs[m].sin6_port = htons(v.port)
            addr_store6(&v.ip, io.addrs[m].sin6_addr.s6_addr)
            io.msgs[m].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        io.msgs[m].msg_hdr.msg_name = &io.addrs[m]
        io.msgs[m].msg_hdr.msg_iovlen = count
        io.msgs[m].msg_hdr.msg_flags = 0
        if count > 1:
            c = <cmsghdr*>(io.ctrl + m * CTRL_SPACE)
            c.cmsg_len = sizeof(cmsghdr) + sizeof(uint16_t)
            c.cmsg_level = SOL_UDP
            c.cmsg_type = UDP_SEGMENT
            (<uint16_t*>(<uint8_t*>c + sizeof(cmsghdr)))[0] = <uint16_t>size
            io.msgs[m].msg_hdr.msg_control = c
            io.msgs[m].msg_hdr.msg_controllen = CTRL_SPACE
        else:
            io.msgs[m].msg_hdr.msg_control = NULL
            io.msgs[m].msg_hdr.msg_controllen = 0
        b.msg_vtep[m] = b.out_vtep[j - 1]
        m += 1
    if m > first:
        flush_messages(core, b, first, m - first, fd_prev)


cdef bint answer_arp(ForwardingCore core, FrameBatch b, Py_ssize_t i, uint32_t vni, int tap_fd) noexcept nogil:
    """ARP suppression: if slot i is an ARP request for an IPv4 address the registry maps to a
    MAC on ``vni``, turn it into the reply in place and write it back to the TAP. Returns
    whether it did (the request is then not sent anywhere). Gratuitous ARP is left alone."""
    cdef uint8_t* f = b.frame_ptr(i)
    cdef uint8_t* a = f + ETH_HLEN
    cdef uint64_t mac
    cdef uint8_t requester[6]
    cdef uint8_t spa[4]
    cdef Py_ssize_t k
    cdef Addr target
    if b.length[i] < ETH_HLEN + 28 or be16(f + 12) != 0x0806:
        return False
    if be16(a) != 1 or be16(a + 2) != 0x0800 or a[4] != 6 or a[5] != 4 or be16(a + 6) != 1:
        return False                                    # Ethernet/IPv4 requests only
    addr_v4(&target, be32(a + 24))
    if memcmp(a + 14, a + 24, 4) == 0 or not core.neigh_lookup(vni, &target, &mac):
        return False
    memcpy(requester, a + 8, 6)
    memcpy(spa, a + 14, 4)
    memcpy(f, requester, 6)                             # Ethernet: to the requester ...
    for k in range(6):
        f[6 + k] = (mac >> (40 - 8 * k)) & 0xFF         # ... from the MAC asked for
    a[7] = 2                                            # op: reply
    memcpy(a + 14, a + 24, 4)                           # sender IP: the address asked for
    memcpy(a + 8, f + 6, 6)                             # sender MAC: its MAC
    memcpy(a + 18, requester, 6)                        # target: the requester
    memcpy(a + 24, spa, 4)
    memset(f - VNET_HLEN, 0, VNET_HLEN)
    if c_write(tap_fd, f - VNET_HLEN, ETH_HLEN + 28 + VNET_HLEN) < 0:
        core.drop_counts[DROP_TAP_WRITE] += 1
    else:
        core.arp_suppressed += 1
    return True


cdef enum:
    ICMP6 = 58
    ND_ROUTER_ADVERT = 134
    ND_NEIGHBOR_SOLICIT = 135
    ND_NEIGHBOR_ADVERT = 136
    IP6_HLEN = 40
    NA_LEN = ETH_HLEN + IP6_HLEN + 32   # Ethernet, IPv6, NA (24 bytes) + target link-layer option


cdef inline int icmp6_type(const uint8_t* f, Py_ssize_t n) noexcept nogil:
    """The ICMPv6 type of an untagged Ethernet/IPv6/ICMPv6 frame (no extension headers), or -1."""
    if n < ETH_HLEN + IP6_HLEN + 4 or be16(f + 12) != 0x86DD or (f[14] >> 4) != 6 or f[20] != ICMP6:
        return -1
    return f[ETH_HLEN + IP6_HLEN]


cdef bint answer_ns(ForwardingCore core, FrameBatch b, Py_ssize_t i, uint32_t vni, int tap_fd) noexcept nogil:
    """NS suppression, as answer_arp for IPv6 (overlay/core/wire.py neighbor_advert is the
    reference): a neighbour solicitation for an address the registry maps to a MAC on ``vni``
    becomes, in place, the solicited neighbour advertisement (S and O set, the target's link-
    layer address option) written back to the TAP. A DAD probe (source ::) is left alone."""
    cdef uint8_t* f = b.frame_ptr(i)
    cdef uint8_t* ip = f + ETH_HLEN
    cdef uint8_t* icmp = ip + IP6_HLEN
    cdef uint8_t requester[6]
    cdef uint8_t asker[16]
    cdef Addr target
    cdef uint64_t mac, acc
    cdef Py_ssize_t k
    cdef uint16_t sum16
    if b.length[i] < ETH_HLEN + IP6_HLEN + 24 or ip[7] != 255 or icmp[1] != 0 or b.max_frame_c < NA_LEN:
        return False
    if be16(ip + 4) < 24 or icmp[8] == 0xFF:
        return False                                    # too short, or a multicast target
    for k in range(16):
        if ip[8 + k]:
            break
    else:
        return False                                    # DAD: source ::
    addr_load6(&target, icmp + 8)
    if not core.neigh_lookup(vni, &target, &mac):
        return False
    memcpy(requester, f + 6, 6)
    memcpy(asker, ip + 8, 16)
    memcpy(f, requester, 6)                             # Ethernet: to the requester ...
    for k in range(6):
        f[6 + k] = (mac >> (40 - 8 * k)) & 0xFF         # ... from the MAC asked for
    ip[0] = 0x60; ip[1] = 0; ip[2] = 0; ip[3] = 0       # version 6, no class or flow label
    put16(ip + 4, 32)                                   # payload: NA + one option
    ip[6] = ICMP6
    ip[7] = 255
    memcpy(ip + 24, asker, 16)                          # to the asker ...
    memcpy(ip + 8, icmp + 8, 16)                        # ... from the target address
    icmp[0] = ND_NEIGHBOR_ADVERT
    icmp[1] = 0
    icmp[2] = 0; icmp[3] = 0
    icmp[4] = 0x60; icmp[5] = 0; icmp[6] = 0; icmp[7] = 0   # flags: solicited, override
    icmp[24] = 2                                        # option: target link-layer address
    icmp[25] = 1
    memcpy(icmp + 26, f + 6, 6)
    acc = ones_add(ip + 8, 32, 0) + 32 + ICMP6          # pseudo-header: addresses, length, next header
    sum16 = ~fold(ones_add(icmp, 32, acc)) & 0xFFFF
    put16(icmp + 2, sum16)
    memset(f - VNET_HLEN, 0, VNET_HLEN)
    if c_write(tap_fd, f - VNET_HLEN, NA_LEN + VNET_HLEN) < 0:
        core.drop_counts[DROP_TAP_WRITE] += 1
    else:
        core.nd_suppressed += 1
    return True


cdef inline bint answered_here(ForwardingCore core, FrameBatch b, Py_ssize_t i, uint32_t vni,
                               int tap_fd) noexcept nogil:
    """Whether frame i of the TAP stays on this host: an ARP request or neighbour
    solicitation answered from the registry, or a router advertisement (dropped, counted:
    a container's RA must not reach other hosts' containers)."""
    cdef int t = icmp6_type(b.frame_ptr(i), b.length[i])
    if t == ND_ROUTER_ADVERT:
        core.drop_counts[DROP_ROUTER_ADVERT] += 1
        return True
    if not core.n_neigh_macs:
        return False
    if t == ND_NEIGHBOR_SOLICIT:
        return answer_ns(core, b, i, vni, tap_fd)
    return answer_arp(core, b, i, vni, tap_fd)


cdef void encap_and_send(ForwardingCore core, FrameBatch b, uint32_t vni, Py_ssize_t n,
                         const Senders* fds) noexcept nogil:
    cdef Py_ssize_t start = 0
    while start < n:
        start = encap_batch(core, b, vni, start, n)
        send_outputs(core, b, fds)


cdef Py_ssize_t pump_tap_to_udp(ForwardingCore core, FrameBatch reads, FrameBatch frames,
                                uint32_t vni, int tap_fd, const Senders* fds,
                                Py_ssize_t budget) noexcept nogil:
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
                encap_and_send(core, frames, vni, used, fds)
                used = 0
                st = prepare_frame(reads.frame_ptr(i), reads.length[i], frames, &used)
            if st != OK:
                core.drop_counts[st] += 1
            elif answered_here(core, frames, used - 1, vni, tap_fd):
                used -= 1                               # answered (or dropped) here: not sent
        encap_and_send(core, frames, vni, used, fds)
        total += n
        if n < reads.slots:
            break                # the TAP is drained
    return total


cdef Py_ssize_t recv_udp(FrameBatch b, int fd) noexcept nogil:
    """recvmmsg into slots 0.. (each at HEADROOM - 8): one message per slot, which UDP_GRO may
    have filled with several datagrams of one size (gso[i]; 0 for a single datagram)."""
    cdef Py_ssize_t i
    cdef int r
    cdef IoArrays* io = &b.rx
    cdef cmsghdr* c
    for i in range(b.slots):
        io.iovs[i].iov_base = b.frame_ptr(i) - VXLAN_HLEN
        io.iovs[i].iov_len = b.max_frame_c + VXLAN_HLEN
        io.msgs[i].msg_hdr.msg_name = &io.addrs[i]
        io.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        io.msgs[i].msg_hdr.msg_iov = &io.iovs[i]
        io.msgs[i].msg_hdr.msg_iovlen = 1
        io.msgs[i].msg_hdr.msg_control = io.ctrl + i * CTRL_SPACE
        io.msgs[i].msg_hdr.msg_controllen = CTRL_SPACE
        io.msgs[i].msg_hdr.msg_flags = 0
    while True:
        r = recvmmsg(fd, io.msgs, b.slots, MSG_DONTWAIT, NULL)
        if r < 0 and errno == EINTR:
            continue
        break
    if r <= 0:
        if r < 0 and errno != EAGAIN:
            b.io_error = errno
        return 0
    for i in range(r):
        b.dgram_len[i] = io.msgs[i].msg_len
        if io.addrs[i].sin6_family == AF_INET6:
            addr_load6(&b.src_ip[i], io.addrs[i].sin6_addr.s6_addr)
        else:
            addr_v4(&b.src_ip[i], ntohl((<sockaddr_in*>&io.addrs[i]).sin_addr.s_addr))
        b.truncated[i] = (io.msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0
        b.gso[i] = 0
        c = <cmsghdr*>(io.ctrl + i * CTRL_SPACE)
        if io.msgs[i].msg_hdr.msg_controllen >= sizeof(cmsghdr) + sizeof(int) \
                and c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
            b.gso[i] = (<int*>(<uint8_t*>c + sizeof(cmsghdr)))[0]
    return r


cdef Py_ssize_t split_datagrams(FrameBatch msgs, Py_ssize_t i, Py_ssize_t* offset, FrameBatch out,
                                Py_ssize_t used) noexcept nogil:
    """Copy the datagrams of message i (from byte offset[0]) into ``out`` slots used..; stop
    when ``out`` is full. Returns the slots used after; offset[0] is where to go on."""
    cdef Py_ssize_t size = msgs.gso[i] if msgs.gso[i] > 0 else msgs.dgram_len[i]
    cdef Py_ssize_t length, early
    cdef uint8_t* base = msgs.frame_ptr(i) - VXLAN_HLEN
    while offset[0] < msgs.dgram_len[i] and used < out.slots:
        length = min(size, msgs.dgram_len[i] - offset[0])
        out.enc[used] = base[offset[0]] == SEAL_DATA   # sealed: placed 16 bytes early (crypto.pxi)
        early = SEAL_HLEN if out.enc[used] else 0
        out.truncated[used] = msgs.truncated[i] or length > out.max_frame_c + VXLAN_HLEN + 2 * early
        out.dgram_len[used] = <uint32_t>length
        out.src_ip[used] = msgs.src_ip[i]
        if not out.truncated[used]:
            memcpy(out.frame_ptr(used) - VXLAN_HLEN - early, base + offset[0], length)
        offset[0] += length
        used += 1
    if msgs.dgram_len[i] == 0 and used < out.slots:    # an empty datagram is still one
        out.enc[used] = 0
        out.truncated[used] = msgs.truncated[i]
        out.dgram_len[used] = 0
        out.src_ip[used] = msgs.src_ip[i]
        offset[0] = 1
        used += 1
    return used


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


cdef inline int tap_of(ForwardingCore core, uint32_t vni, int tap_fd) noexcept nogil:
    cdef Net* net = core.net_of(vni)
    return net.tap_fd if net != NULL and net.tap_fd >= 0 else tap_fd


cdef void write_tap(ForwardingCore core, FrameBatch b, Py_ssize_t n, FrameBatch merge,
                    int tap_fd) noexcept nogil:
    """The passing frames of a decapsulated batch to their network's TAP (``tap_fd`` unless
    the network has its own), in order, runs of one TCP stream's segments coalesced into
    super-frames (offload.coalesce)."""
    cdef Py_ssize_t i, count = 0, total = 0
    cdef Py_ssize_t run[MAX_RUN]
    cdef Seg head, last, s
    cdef bint seg
    for i in range(n):
        if b.status[i] != OK:
            continue
        seg = tcp_segment(b.frame_ptr(i), b.length[i], &s)
        if count and seg and b.vni[i] == b.vni[run[0]] \
                and joins(b.frame_ptr(run[0]), &head, &last, total, count, b.frame_ptr(i), &s):
            run[count] = i
            count += 1
            last = s
            total += s.payload
            continue
        if count:
            write_run(core, b, run, count, &head, &last, merge, tap_of(core, b.vni[run[0]], tap_fd))
            count = 0
        if seg:
            run[0] = i
            count = 1
            head = s
            last = s
            total = s.payload
        else:
            write_plain(core, b, i, tap_of(core, b.vni[i], tap_fd))
    if count:
        write_run(core, b, run, count, &head, &last, merge, tap_of(core, b.vni[run[0]], tap_fd))


cdef Py_ssize_t pump_udp_to_tap(ForwardingCore core, FrameBatch msgs, FrameBatch frames,
                                FrameBatch merge, int udp_fd, int tap_fd, Py_ssize_t budget) noexcept nogil:
    """recvmmsg (into ``msgs``) -> split (into ``frames``) -> decap -> TAP writes; returns the
    number of datagrams."""
    cdef Py_ssize_t n, i, used, offset, total = 0
    while total < budget:
        n = recv_udp(msgs, udp_fd)
        if n == 0:
            break
        used = 0
        for i in range(n):
            offset = 0
            while True:
                used = split_datagrams(msgs, i, &offset, frames, used)
                if used < frames.slots:
                    break
                decap_batch(core, frames, used)          # frames is full: deliver, go on
                write_tap(core, frames, used, merge, tap_fd)
                total += used
                used = 0
                if offset > 0 and offset >= msgs.dgram_len[i]:
                    break                                # (offset 0: not even begun)
        decap_batch(core, frames, used)
        write_tap(core, frames, used, merge, tap_fd)
        total += used
        if n < msgs.slots:
            break                          # the socket is drained
    return total
