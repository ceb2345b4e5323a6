# ---- syscalls.pxi: the C declarations the pumps need, and their per-batch header arrays ----

cdef extern from "<sys/uio.h>":
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>":
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags, void* timeout) nogil
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int n, int flags) nogil
    int MSG_DONTWAIT, MSG_TRUNC, AF_INET, AF_INET6
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

cdef extern from "<netinet/in.h>":
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    uint16_t htons(uint16_t) nogil
    uint32_t htonl(uint32_t) nogil
    uint32_t ntohl(uint32_t) nogil
    uint16_t ntohs(uint16_t) nogil

cdef extern from "<unistd.h>":
    ssize_t c_read "read"(int fd, void* buf, size_t n) nogil
    ssize_t c_write "write"(int fd, const void* buf, size_t n) nogil

from libc.errno cimport errno, EINTR, EMSGSIZE, EINVAL, EAGAIN

cdef enum:
    SOL_UDP = 17
    UDP_SEGMENT = 103   # send: cut this message into datagrams of N bytes (UDP GSO)
    UDP_GRO = 104       # receive: consecutive datagrams of a flow arrive as one message
    CTRL_SPACE = 24     # CMSG_SPACE(sizeof(int)) on 64-bit Linux


cdef struct IoArrays:
    mmsghdr* msgs       # one per slot (receive) or per message (send)
    iovec* iovs         # receive: one per slot; send: one per datagram
    sockaddr_in6* addrs   # room for either family: an IPv4 peer's is a sockaddr_in in it
    uint8_t* ctrl       # CTRL_SPACE bytes per message: the UDP_SEGMENT / UDP_GRO control message


cdef int io_init(IoArrays* io, Py_ssize_t n) except -1:
    io.msgs = <mmsghdr*>calloc(n, sizeof(mmsghdr))
    io.iovs = <iovec*>calloc(2 * n, sizeof(iovec))
    io.addrs = <sockaddr_in6*>calloc(n, sizeof(sockaddr_in6))
    io.ctrl = <uint8_t*>calloc(n, CTRL_SPACE)
    if io.msgs == NULL or io.iovs == NULL or io.addrs == NULL or io.ctrl == NULL:
        raise MemoryError()
    return 0


cdef void io_free(IoArrays* io) noexcept:
    free(io.msgs); free(io.iovs); free(io.addrs); free(io.ctrl)


