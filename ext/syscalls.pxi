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
    int MSG_DONTWAIT, MSG_TRUNC, AF_INET

cdef extern from "<netinet/in.h>":
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint16_t htons(uint16_t) nogil
    uint32_t htonl(uint32_t) nogil
    uint32_t ntohl(uint32_t) nogil
    uint16_t ntohs(uint16_t) nogil

cdef extern from "<unistd.h>":
    ssize_t c_read "read"(int fd, void* buf, size_t n) nogil
    ssize_t c_write "write"(int fd, const void* buf, size_t n) nogil

from libc.errno cimport errno, EINTR, EMSGSIZE

cdef enum:
    UDP_HLEN = 8


cdef struct IoArrays:
    mmsghdr* msgs       # one per slot (receive) or per output (send)
    iovec* iovs         # receive: one per slot; send: two per output
    sockaddr_in* addrs
    uint8_t* udp_hdrs   # send: 8 bytes per output


cdef int io_init(IoArrays* io, Py_ssize_t n) except -1:
    io.msgs = <mmsghdr*>calloc(n, sizeof(mmsghdr))
    io.iovs = <iovec*>calloc(2 * n, sizeof(iovec))
    io.addrs = <sockaddr_in*>calloc(n, sizeof(sockaddr_in))
    io.udp_hdrs = <uint8_t*>calloc(n, UDP_HLEN)
    if io.msgs == NULL or io.iovs == NULL or io.addrs == NULL or io.udp_hdrs == NULL:
        raise MemoryError()
    return 0


cdef void io_free(IoArrays* io) noexcept:
    free(io.msgs); free(io.iovs); free(io.addrs); free(io.udp_hdrs)


